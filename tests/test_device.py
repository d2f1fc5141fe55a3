"""The device trainer (LiteRT bundle, numpy runtime) against the desktop trainer (JAX), under
a draining battery, across kill -9, and in a virtual environment with only the runtime
extra. One small GPT-2 (real GPT-2 tokenizer) LoRA bundle is exported once per session."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mobiletune.io import safetensors as st  # noqa: E402
from mobiletune.runtime.device_trainer import device_train  # noqa: E402
from tests.helpers import PhoneClock, draining_trace, kill_after_steps, losses, write_recipe  # noqa: E402
from tests.tiny import tiny_gpt2_dir  # noqa: E402


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    from export.monolithic_bundle import export_bundle
    from mobiletune import assets
    from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe
    root = tmp_path_factory.mktemp("device")
    model = tiny_gpt2_dir(root / "model")
    data = root / "data.txt"
    data.write_text(assets.read_text("botchan")[:20000], encoding="utf-8")
    recipe = Recipe(name="device", model=str(model), data=(str(data),), seq_len=24,
                    micro_batch=4, accumulation=1, steps=8, val_fraction=0.1,
                    lora=LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc")),
                    optim=OptimConfig(lr=5e-3, warmup_steps=2), eval_every=0,
                    checkpoint_every=4)
    rfile = write_recipe(root / "recipe.py", recipe)
    export_bundle(recipe, root / "bundle", variants=(1, 2, 4))
    return root, rfile, recipe, root / "bundle", data


@pytest.fixture(scope="session")
def reference_run(setup):
    root, _, _, bundle, data = setup
    out = root / "ref"
    r = device_train(bundle, [data], out, battery="none")
    assert r.finished and r.step == 8
    return out


def test_device_equals_desktop(setup, reference_run):
    from mobiletune.train.trainer import train
    root, _, recipe, _, _ = setup
    desk = root / "desktop"
    train(recipe, desk)
    ld, lp = losses(desk), losses(reference_run)
    assert len(ld) == len(lp) == 8
    assert max(abs(a - b) for a, b in zip(ld, lp)) <= 1e-5, (ld, lp)
    a = st.load(desk / "adapter" / "adapter_model.safetensors")
    b = st.load(reference_run / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)


def test_phone_adapter_loads_on_the_desktop(setup, reference_run, capsys, tmp_path):
    """``mobiletune ppl --adapter`` with the phone's PEFT adapter equals the perplexity of the
    base model with that adapter merged into its weights (a separately written HF dir)."""
    from mobiletune.cli import main
    from mobiletune.formats.hf import load_hf_dir, save_hf_dir
    from mobiletune.formats.peft import load_adapter
    from mobiletune.models import lora
    from mobiletune.runtime.tokenizer import Tokenizer
    root, _, recipe, _, data = setup
    cfg, base = load_hf_dir(recipe.model)
    lcfg, adapter = load_adapter(reference_run / "adapter", cfg)
    assert any(np.abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    save_hf_dir(tmp_path / "merged", cfg, lora.merge(base, adapter, cfg, lcfg),
                tokenizer=Tokenizer.from_dir(recipe.model))
    args = ["--text", str(data), "--seq-len", "64", "--max-windows", "2"]
    ppl = []
    for model in (["--model", recipe.model, "--adapter", str(reference_run / "adapter")],
                  ["--model", str(tmp_path / "merged")]):
        assert main(["ppl", *model, *args]) == 0
        ppl.append(float(capsys.readouterr().out.strip().splitlines()[-1].split()[0][4:]))
    assert abs(ppl[0] / ppl[1] - 1) <= 1e-5, ppl


def test_draining_battery_switches_pauses_resumes_and_ends_equal(setup, reference_run, tmp_path):
    root, _, _, bundle, data = setup
    trace = draining_trace(tmp_path / "trace.csv")
    out = tmp_path / "battery"
    r = device_train(bundle, [data], out, battery=f"trace:{trace}", clock=PhoneClock())
    assert r.finished
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in rows if "loss" in x]
    events = [x["event"] for x in rows if "event" in x]
    assert len({x["variant"] for x in steps}) >= 2, "no variant switch"
    assert any(x["sleep"] > 0 for x in steps), "no throttle"
    assert "pause" in events and "resume" in events
    assert [x["variant"] for x in steps] == [4, 4, 2, 2, 1, 1, 4, 4]
    assert all(x["charging"] for x in steps[6:])
    a = st.load(reference_run / "adapter" / "adapter_model.safetensors")
    b = st.load(out / "adapter" / "adapter_model.safetensors")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)


def kill_at(bundle, data, out, steps_done) -> None:
    """``device train`` (24 steps, a checkpoint every step) killed with SIGKILL once it has
    logged each of ``steps_done`` steps, resumed in between."""
    cmd = [sys.executable, "-m", "mobiletune.runtime", "train", str(bundle), "--data", str(data),
           "--out", str(out), "--battery", "none", "--checkpoint-every", "1", "--steps", "24"]
    kill_after_steps(lambda resume: subprocess.Popen(
        cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL), out, steps_done)


def test_kill_nine_three_times_then_resume_equals_uninterrupted(setup, tmp_path):
    root, _, _, bundle, data = setup
    ref = tmp_path / "ref24"
    device_train(bundle, [data], ref, steps=24, battery="none")
    out = tmp_path / "killed"
    rng = np.random.default_rng(7)
    kill_at(bundle, data, out, sorted(rng.choice(np.arange(3, 22), 3, replace=False)))
    r = device_train(bundle, [data], out, steps=24, battery="none", resume=True)
    assert r.finished
    a = st.load(ref / "state.safetensors")
    b = st.load(out / "state.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert losses(ref) == losses(out)


def test_truncated_latest_checkpoint_falls_back(setup, tmp_path, capsys):
    root, _, _, bundle, data = setup
    out = tmp_path / "trunc"
    r = device_train(bundle, [data], out, steps=6, battery="none", checkpoint_every=2,
                     stop_after=5)
    assert not r.finished
    ck = sorted((out / "checkpoints").glob("step-*"))
    latest = ck[-1] / "state.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    capsys.readouterr()
    r = device_train(bundle, [data], out, steps=6, battery="none", resume=True)
    said = capsys.readouterr().err
    assert "is damaged" in said and f"resumed from step {int(ck[-2].name[5:])}" in said
    assert r.finished
    ref = tmp_path / "ref6"
    device_train(bundle, [data], ref, steps=6, battery="none")
    a, b = st.load(ref / "state.safetensors"), st.load(out / "state.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_fresh_venv_with_only_the_runtime_extra(setup, tmp_path):
    """pip install '.[runtime]' into a new venv (no JAX, no TF) and train there."""
    root, _, _, bundle, data = setup
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    repo = Path(__file__).resolve().parent.parent
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the work tree
    shutil.copytree(repo, src, ignore=shutil.ignore_patterns(".venv", ".git", "out", "*.egg-info",
                                                             "__pycache__", "build"))
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", f"{src}[runtime]"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "out"
    r = subprocess.run([str(py), "-c",
                        "import sys, runpy; sys.argv = ['x', 'train', sys.argv[1], '--data', "
                        "sys.argv[2], '--out', sys.argv[3], '--battery', 'none', '--steps', '2']; "
                        "import importlib.util as u; "
                        "assert all(u.find_spec(m) is None for m in ('jax', 'tensorflow', 'torch')); "
                        "runpy.run_module('mobiletune.runtime', run_name='__main__')",
                        str(bundle), str(data), str(out)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_doctor_checks_a_bundle_and_this_device(setup, tmp_path):
    root, _, _, bundle, _ = setup
    doc = [sys.executable, "-m", "mobiletune.runtime", "doctor"]
    r = subprocess.run(doc + [str(bundle), "--battery", "none"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for fact in ("architecture:", "cores:", "MemAvailable:", "LiteRT:", "battery:",
                 "storage free beside the bundle:", "XNNPACK:", "predicted step:",
                 "predicted peak RSS:"):
        assert fact in r.stdout, fact
    assert "XNNPACK:" in r.stdout and "active" in r.stdout
    assert r.stdout.strip().endswith("ok: no problems found")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "program.tflite").write_bytes(b"not a program")
    r = subprocess.run(doc + [str(broken), "--battery", "none"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    problems = [x for x in r.stdout.splitlines() if x.startswith("problem:")]
    assert len(problems) == 1 and "program.tflite" in problems[0], r.stdout
    r = subprocess.run(doc + ["--battery", "trace:/nonexistent.csv"], capture_output=True, text=True)
    assert r.returncode == 1 and "problem: battery: trace /nonexistent.csv" in r.stdout, r.stdout
