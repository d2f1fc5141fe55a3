"""Where a sharded training step's time goes, per lever, side by side in one run.

  python benchmarks/sharded_profile.py BUNDLE [--steps 3] [--threads 2] [--state-store disk]

Runs one micro-batch + optimizer step of the sharded bundle (random tokens, the bundle's
largest micro-batch) under each configuration, each in its own process (peak RSS from
``wait4``), timing every signature call (``ShardedRunner.call``) and the head:

  ``program-head``  the head's chunks as the bundle's ``head_fwd`` signature in LiteRT,
                    every block's backward pass recomputing its forward (no budget)
  ``host-head``     the head's chunks in numpy (``runtime/sharded/head.py``, ``--head host``)
  ``saved``         host head and a budget with room for every layer's residuals
                    (``block_fwd_save`` / ``block_bwd_saved``: no recompute); the weight
                    cache that the rest of such a budget would buy is switched off, so the
                    row shows this lever alone

Prints a markdown table: s/step (median of ``--steps`` after one warm-up step, which is
also the micro-batch that measures the budget's room), its ratio to ``program-head``, peak
RSS, and the seconds in block forwards, block backwards, the head and everything else
(host work: embedding rows, weight reads, chunk merging, the optimizer's host side).
"""

from __future__ import annotations

import argparse
import json
import sys

import common

CONFIGS = {"program-head": {"head": "program", "budget": None},
           "host-head": {"head": "host", "budget": None},
           "saved": {"head": "host", "budget": 100_000}}

CHILD = r"""
import collections, json, re, sys, tempfile, time
import numpy as np
from mobiletune.runtime.runner import open_bundle
from mobiletune.runtime.sharded import chain
bundle, head, budget, steps, threads, store = sys.argv[1:4] + [int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]]
r = open_bundle(bundle, threads=threads, verify=False, head=head, state_store=store,
                state_dir=(run_dir := tempfile.TemporaryDirectory(prefix="mobiletune-profile-")).name,
                memory_budget_mb=None if budget == "None" else float(budget))
T = collections.defaultdict(float)
call = r.call
def timed(name, ins):
    t = time.perf_counter(); o = call(name, ins); T[re.sub(r"(_k\d+)?_b\d+$", "", name)] += time.perf_counter() - t
    return o
r.call = timed
def timed_host(fn, key):
    def timed_fn(*a, **kw):
        t = time.perf_counter(); o = fn(*a, **kw); T[key] += time.perf_counter() - t
        return o
    return timed_fn
chain.head_chunk = timed_host(chain.head_chunk, "head_fwd")
chain.head_wgrad_chunk = timed_host(chain.head_wgrad_chunk, "head_wgrad")
k, t = max(r.manifest.variants), int(r.manifest.data["seq_len"])
v = int(r.manifest.model["vocab_size"])
rng = np.random.default_rng(0)
batch = {"inputs": rng.integers(0, v, (k, t)).astype(np.int32),
         "targets": rng.integers(0, v, (k, t)).astype(np.int32),
         "loss_mask": np.ones((k, t), np.float32)}
rows = []
for i in range(steps + 1):
    T.clear()
    t0 = time.perf_counter(); r.accumulate(batch); r.apply(); total = time.perf_counter() - t0
    rows.append({"step_s": total, **T})
    r.cache.set_capacity(0)   # the saved-residual lever alone: no cached weights
print(json.dumps({"rows": rows[1:], "saved_layers": r.saved_layers(k), "tokens": k * t}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="a sharded bundle directory (python -m export ... --sharded)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    ap.add_argument("--state-store", default="auto", choices=("auto", "ram", "disk"),
                    help="the same for every configuration (a budget would move auto's choice)")
    args = ap.parse_args(argv)
    res = {}
    for name in args.configs.split(","):
        c = CONFIGS[name]
        ch = common.run([sys.executable, "-c", CHILD, args.bundle, c["head"], c["budget"],
                         args.steps, args.threads, args.state_store], args.threads)
        if ch.rc:
            print(f"{name}: failed: {ch.error()}", file=sys.stderr)
            return 1
        out = ch.last_json()
        rows = out["rows"]
        med = {key: common.median([r.get(key, 0.0) for r in rows])
               for key in {k for r in rows for k in r}}
        res[name] = {**med, "peak_rss_mb": ch.peak_rss_mb, "saved_layers": out["saved_layers"],
                     "tokens": out["tokens"]}
        print(f"{name}: {med['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    base = res.get("program-head", next(iter(res.values())))["step_s"]
    print(f"`benchmarks/sharded_profile.py {args.bundle}`: median of {args.steps} steps, "
          f"{args.threads} threads\n")
    print("| config | s/step | tokens/s | vs program-head | peak RSS MB | saved layers | "
          "block fwd s | block bwd s | head s | rest s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in res.items():
        fwd = m.get("block_fwd", 0) + m.get("block_fwd_save", 0)
        bwd = m.get("block_bwd", 0) + m.get("block_bwd_saved", 0)
        head = m.get("head_fwd", 0)
        rest = m["step_s"] - fwd - bwd - head
        print(f"| {name} | {m['step_s']:.3f} | {m['tokens'] / m['step_s']:.0f} | "
              f"{base / m['step_s']:.2f}× | {m['peak_rss_mb']:.0f} | {m['saved_layers']} | "
              f"{fwd:.3f} | {bwd:.3f} | {head:.3f} | {rest:.3f} |")
    print("\n" + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
