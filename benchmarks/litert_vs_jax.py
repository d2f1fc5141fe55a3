"""The exported bundle on LiteRT (what the phone runs) vs the JAX jit step it was traced from,
plus what export costs. Each measurement runs in its own process, side by side in one run.

  python benchmarks/litert_vs_jax.py [--workloads lora,full] [--steps 5]

Workloads: a GPT-2-layout model of width 256, 4 layers, the real GPT-2 vocabulary
(50,257), random init; LoRA r8 (c_attn, c_fc) at b4×s128 and full fine-tuning at b4×s64.
Figures: median s/step after one warm-up step, tokens/s, peak RSS of the process; export
seconds, converter peak RSS, bundle bytes / needed bytes; the scheduler's cost per step.
Goals (issue 4/5): LiteRT ≥ 1.0× JAX tokens/s for LoRA; bundle ≤ 1.1× needed bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {"lora": dict(lora=True, b=4, t=128), "full": dict(lora=False, b=4, t=64)}

RECIPE = """
from mobiletune.train.recipe import Recipe
from mobiletune.models.lora import LoraConfig
from mobiletune.train.optim import OptimConfig
recipe = Recipe(name="bench", model={model!r}, data=("x",), seq_len={t}, micro_batch={b},
                lora={lora}, optim=OptimConfig(lr=1e-4), loss_chunk={chunk})
"""

CHILD = r"""
import json, resource, sys, time
import numpy as np
what, recipe_path, bundle, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if what == "export":
    from export.monolithic_bundle import export_bundle
    from mobiletune.train.recipe import load_recipe
    rep = export_bundle(load_recipe(recipe_path), bundle, variants=(load_recipe(recipe_path).micro_batch,), verify=False)
    print(json.dumps({**rep, "peak_rss_mb": peak()})); sys.exit()
times = []
if what == "litert":
    from mobiletune.runtime.runner import open_bundle
    r = open_bundle(bundle, threads=2)
    b, t = max(r.manifest.variants), r.manifest.seq_len
    x = np.random.default_rng(0).integers(0, 50000, (b, t + 1)).astype(np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "loss_mask": np.ones((b, t), np.float32)}
    for i in range(steps + 1):
        t0 = time.perf_counter(); r.train_step(batch); times.append(time.perf_counter() - t0)
else:
    import jax, jax.numpy as jnp
    from mobiletune.formats.loading import load_model
    from mobiletune.programs.monolithic import Program
    from mobiletune.train.recipe import load_recipe
    from mobiletune.train.setup import build_steps
    rc = load_recipe(recipe_path)
    steps_, tr, fr = build_steps(rc, load_model(rc.model))
    prog = Program(steps_, tr, fr, rc.seq_len)
    state = {k: jnp.asarray(v) for k, v in prog.initial_state().items()}
    from mobiletune.runtime import bundle as B
    fr = {B.frozen_name(k): v for k, v in fr.items()}
    b, t = rc.micro_batch, rc.seq_len
    x = np.random.default_rng(0).integers(0, 50000, (b, t + 1)).astype(np.int32)
    args = (jnp.asarray(x[:, :-1]), jnp.asarray(x[:, 1:]), jnp.ones((b, t), jnp.float32))
    f = jax.jit(prog.train_step)
    for i in range(steps + 1):
        t0 = time.perf_counter(); upd, out = f(state, fr, *args); jax.block_until_ready(out)
        state = {**state, **upd}; times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": sorted(times[1:])[len(times[1:]) // 2], "peak_rss_mb": peak()}))
"""


def child(*args):
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    if r.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def scheduler_cost_us(n=20000) -> float:
    from mobiletune.runtime.energy.scheduler import Reading, Thresholds, decide
    th, d = Thresholds(), None
    t0 = time.perf_counter()
    for i in range(n):
        d = decide(Reading(time=i, level=100 - (i % 100), charging=False, temperature_c=35.0),
                   th, (1, 2, 4), d)
    return (time.perf_counter() - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="lora,full")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--loss-chunk", type=int, default=64, help="positions per loss chunk")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny import tiny_gpt2_dir
    results = {}
    with tempfile.TemporaryDirectory(prefix="mobiletune-bench-") as tmp:
        model = tiny_gpt2_dir(Path(tmp) / "model", n_layer=4, n_embd=256)
        for w in args.workloads.split(","):
            spec = WORKLOADS[w]
            rp = Path(tmp) / f"{w}.py"
            lora = "LoraConfig(r=8, alpha=16, target_modules=('c_attn', 'c_fc'))" if spec["lora"] else "None"
            rp.write_text(RECIPE.format(model=str(model), t=spec["t"], b=spec["b"], lora=lora,
                                      chunk=args.loss_chunk))
            bundle = Path(tmp) / f"{w}-bundle"
            res = {"export": child("export", rp, bundle, 0)}
            res["jax"] = child("jax", rp, bundle, args.steps)
            res["litert"] = child("litert", rp, bundle, args.steps)
            results[w] = res
    sched = scheduler_cost_us()
    print(f"\n{time.strftime('%Y-%m-%d')}  GPT-2 layout d256 L4 V50257, median of {args.steps} "
          f"steps after warm-up, 2 threads\n")
    print("| workload | system | s/step | tokens/s | peak RSS MB | LiteRT/JAX speed |")
    print("|---|---|---:|---:|---:|---:|")
    for w, res in results.items():
        b, t = WORKLOADS[w]["b"], WORKLOADS[w]["t"]
        for s in ("jax", "litert"):
            r = res[s]
            print(f"| {w} b{b}×s{t} | {s} | {r['step_s']:.3f} | {b * t / r['step_s']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {res['jax']['step_s'] / r['step_s']:.2f}× |")
    print("\n| workload | export s | converter peak RSS MB | bundle bytes | needed bytes | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for w, res in results.items():
        e = res["export"]
        print(f"| {w} | {e['export_seconds']:.1f} | {e['peak_rss_mb']:.0f} | {e['bundle_bytes']:,} | "
              f"{e['needed_bytes']:,} | {e['ratio']:.3f}× |")
    print(f"\nscheduler decide(): {sched:.1f} µs per step")
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "scheduler_us": sched}, indent=2))


if __name__ == "__main__":
    main()
