"""The benchmark runs end to end (``benchmarks/run.py --quick``: tiny random GPT-2, every
system in its own process) and writes its JSON, markdown and plots. No speed is asserted:
speed and memory goals live in the benchmark's report, never in timed tests."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mobiletune import assets
from tests.helpers import require_asset

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

MISSING = [m for m in ("tensorflow", "torch", "peft", "matplotlib") if importlib.util.find_spec(m) is None]


def test_flops_per_token_formula(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import run
    # GPT-2 small: 124,439,808 params, minus wte (50257×768) and wpe (1024×768), plus the
    # tied head's matmul (50257×768) = 123,653,376
    n = 124_439_808 - 1024 * 768
    assert run.flops_per_token("preset:gpt2", is_lora=True) == 4 * n
    assert run.flops_per_token("preset:gpt2", is_lora=False) == 6 * n


@pytest.mark.skipif(bool(MISSING), reason=f"not installed: {MISSING}")
def test_quick_run_writes_results(tmp_path):
    require_asset(assets.text_path, "shakespeare:macbeth")
    r = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [js] = tmp_path.glob("*-quick.json")
    res = json.loads(js.read_text())
    assert set(res["workloads"]) == {"tiny-lora", "tiny-full"}
    peak = res["machine"]["peak"]  # the yardstick: every GEMM probe ran, MFU is against the best
    assert {k: v["status"] for k, v in peak["probes"].items()} == dict.fromkeys(
        ("numpy", "torch", "litert-bmm", "litert-fc"), "ok"), peak["probes"]
    assert peak["best_gflops"] == max(v["gflops"] for v in peak["probes"].values())
    assert res["machine"]["matmul_peak_gflops"] == peak["best_gflops"]
    assert "BATCH_MATMUL" in peak["probes"]["litert-bmm"]["ops"]
    for name, w in res["workloads"].items():
        st = {s: x["status"] for s, x in w["systems"].items()}
        assert st["jax"] == st["torch"] == st["device"] == "ok", (name, st)
        assert st["device-sharded"] in ("ok", "not available"), (name, st)
        assert st["device-sharded-saved"] == st["device-sharded"], (name, st)
        assert st["device-sharded-ram"] == ("n/a" if w["lora"] else st["device-sharded"]), st
        for s, x in w["systems"].items():
            if x["status"] == "ok":
                assert x["tokens_per_s"] > 0 and x["peak_rss_mb"] > 0 and 0 < x["mfu"] < 1
                assert len(x["times"]) == res["steps"] + 1
        assert w["systems"]["device"]["export"]["bundle_bytes"] > 0
    md = js.with_suffix(".md").read_text()
    assert "| tiny-lora | device |" in md and "## Goals" in md and "| litert-fc |" in md
    assert "| tiny-lora | device |" in r.stdout  # the table is printed too
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name.split("quick-")[1] for p in pngs] == ["peak-rss.png", "tokens-per-s.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_desktop_profile_sums_the_trace_by_op(tmp_path):
    """``child.py``'s profile (``xla_trace``) of a tiny GPT-2's full fine-tuning step: the
    thunks are found by their HLO ops, so every class that such a step has (the model's
    and the head's matmuls, elementwise work, the optimizer) gets time, and the classes
    add up to the traced time."""
    from tests.tiny import tiny_gpt2_dir
    model = tiny_gpt2_dir(tmp_path / "tiny", n_layer=3, n_embd=48)
    spec = {"system": "jax", "model": str(model), "batch": 2, "seq": 16, "lora": None,
            "steps": 1, "threads": 1, "profile": 2}
    r = subprocess.run([sys.executable, str(BENCH / "child.py"), json.dumps(spec)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(r.stdout.strip().splitlines()[-1])["profile"]
    assert abs(sum(p["classes"].values()) - p["traced_s"]) < 1e-9
    assert all(v > 0 for v in p["classes"].values()), p["classes"]
    assert p["flops"] > 0
    assert [o["s"] for o in p["top"]] == sorted((o["s"] for o in p["top"]), reverse=True)
    sys.path.insert(0, str(BENCH))
    import xla_trace
    assert xla_trace.classify("ynn_fusion", "jvp(...q,qp->...p)/dot_general") == "matmuls"
    assert xla_trace.classify("ynn_fusion", "jvp()/while/body/closed_call/reduce_sum") == "head, elementwise"
