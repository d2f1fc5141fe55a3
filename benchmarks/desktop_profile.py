"""Where the desktop trainer's step time goes, from XLA's own trace.

  python benchmarks/desktop_profile.py [--workloads gpt2-lora,...] [--steps 4] [--trace 2]
                                       [--top 8]

For each workload of ``run.py`` (same model, batch and LoRA), in a fresh process
(``child.py``): the jitted, state-donating ``train_step`` that ``mobiletune train`` runs,
``--steps`` timed steps after a warm-up, then ``--trace`` steps under ``jax.profiler``,
summed per XLA thunk (``xla_trace.py``). Prints, per workload, the step's seconds by class
(matmuls of the model, the loss head's matmuls and its elementwise work, the rest of the
forward and backward, the optimizer), XLA's FLOP count as GFLOP/s, and the costliest ops.
Compare classes within a run: the machine is noisy across runs.
"""

from __future__ import annotations

import argparse
import json
import sys

import common
import run as bench
import xla_trace


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default=",".join(bench.WORKLOADS), help="comma-separated")
    ap.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    ap.add_argument("--trace", type=int, default=2, help="traced steps after those")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=8, help="ops listed per workload")
    args = ap.parse_args(argv)
    results = {}
    for name in args.workloads.split(","):
        if name not in bench.WORKLOADS:
            ap.error(f"--workloads: unknown {name!r}; known: {', '.join(bench.WORKLOADS)}")
        w = bench.WORKLOADS[name]
        spec = {"system": "jax", "model": w.model, "batch": w.batch, "seq": w.seq,
                "lora": w.lora, "steps": args.steps, "threads": args.threads,
                "profile": args.trace}
        ch = common.time_steps(spec, args.threads)
        if ch.rc:
            print(f"{name}: failed: {ch.error()}", file=sys.stderr)
            return 1
        res = ch.last_json()
        res["peak_rss_mb"] = ch.peak_rss_mb
        results[name] = res
        print(f"{name}: {res['step_s']:.3f} s/step", file=sys.stderr, flush=True)
        print_workload(w, res, args.top)
    print(json.dumps(results))
    return 0


def print_workload(w, res: dict, top: int) -> None:
    p, step = res["profile"], res["step_s"]
    flops = p.get("flops") or 0.0
    print(f"\n### {w.name}: {w.label}\n")
    print(f"{step:.3f} s/step (median), {w.batch * w.seq / step:.0f} tokens/s, "
          f"{flops / 1e9:.0f} GFLOP/step (XLA's count) = {flops / step / 1e9:.0f} GFLOP/s, "
          f"peak RSS {res['peak_rss_mb']:.0f} MB; thunk time summed {p['traced_s']:.3f} s/step "
          f"(above the step where independent thunks ran at once)\n")
    print("| class | s/step | share of thunk time |")
    print("|---|---:|---:|")
    for cls in xla_trace.CLASSES:
        s = p["classes"][cls]
        print(f"| {cls} | {s:.3f} | {s / p['traced_s']:.0%} |")
    print("\n| op | output | calls/step | s/step |")
    print("|---|---|---:|---:|")
    for o in p["top"][:top]:
        print(f"| {o['kind']}: `{o['op']}` | {o['shape']} | {o['per_step']} | {o['s']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
