"""Desktop LoRA train-step speed and memory: mobiletune (JAX jit) vs transformers + PEFT
(torch CPU), same model, batch, sequence and LoRA targets, each in its own process.

  python benchmarks/train_step.py [--workloads smollm2,gemma3] [--steps 5]

Figures: median seconds per optimizer step after a warm-up step, tokens/s, and the
child's peak RSS (the steps are timed by ``child.py``, shared with ``run.py``, which runs
the same comparison on the issue's workloads plus the device trainer).
Goal (issue 3): ≥ 1.2× their tokens/s at ≤ their peak memory.
"""

from __future__ import annotations

import argparse
import json
import time

import common

WORKLOADS = {  # name: (model asset, batch, seq, LoRA targets)
    "smollm2": ("smollm2-135m", 4, 128, ["q_proj", "v_proj"]),
    "gemma3": ("gemma3-270m", 8, 64, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}
SYSTEMS = {"mobiletune": "jax", "transformers+peft": "torch"}  # table name: child.py system


def run_child(system, model, b, t, targets, steps, threads):
    spec = {"system": system, "model": model, "batch": b, "seq": t, "steps": steps,
            "threads": threads, "lora": {"r": 8, "alpha": 16, "targets": list(targets)}}
    c = common.time_steps(spec, threads)
    if c.rc:
        raise SystemExit(f"{system} on {model} failed:\n{c.stderr[-3000:]}")
    r = c.last_json()
    return {"step_s": r["step_s"], "first_s": r["times"][0], "peak_rss_mb": c.peak_rss_mb}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="smollm2,gemma3")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    rows = {}
    for w in args.workloads.split(","):
        model, b, t, targets = WORKLOADS[w]
        rows[w] = {name: run_child(s, model, b, t, targets, args.steps, args.threads)
                   for name, s in SYSTEMS.items()}
    print(f"\n{time.strftime('%Y-%m-%d')}  LoRA r8, median of {args.steps} steps after warm-up, "
          f"{args.threads} threads\n")
    print("| workload | system | s/step | tokens/s | peak RSS MB | speed ratio | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for w, res in rows.items():
        _, b, t, _ = WORKLOADS[w]
        ref = res["transformers+peft"]
        for s, r in res.items():
            print(f"| {w} b{b}×s{t} | {s} | {r['step_s']:.2f} | {b * t / r['step_s']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {ref['step_s'] / r['step_s']:.2f}× | "
                  f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}× |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
