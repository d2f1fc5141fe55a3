"""Load time and forward tokens/s: mobiletune (JAX, jit) vs transformers (torch CPU), on the
real GGUF models, measured side by side in one run. Prints a markdown table of ratios.

  python benchmarks/load_forward.py [--models smollm2-135m,gemma3-270m] [--tokens 256]

Each system runs in its own subprocess (a fresh interpreter, so neither warms the other's
caches or page cache unfairly beyond the OS's), timed from inside the child.
Goal (issue 2): mobiletune's GGUF load of Gemma 3 270M ≥ 3× faster than transformers',
forward at least at parity.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time
system, model, n_tok, reps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import numpy as np
toks = np.random.default_rng(0).integers(100, 1000, (1, n_tok)).astype(np.int32)
t0 = time.perf_counter()
if system == "mobiletune":
    import jax, jax.numpy as jnp
    from mobiletune.formats.loading import load_model
    from mobiletune import models
    m = load_model(model)
    params = {k: jnp.asarray(v) for k, v in m.params.items()}
    jax.block_until_ready(params)
    load_s = time.perf_counter() - t0
    fwd = jax.jit(lambda p, t: models.forward(p, m.cfg, t)[0])
    run = lambda: jax.block_until_ready(fwd(params, jnp.asarray(toks)))
else:
    import torch
    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM
    from mobiletune.formats.loading import resolve_model_path
    p = resolve_model_path(model)
    tm = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tt = torch.as_tensor(toks, dtype=torch.long)
    def run():
        with torch.no_grad():
            return tm(tt).logits
t1 = time.perf_counter(); run(); first_s = time.perf_counter() - t1
times = []
for _ in range(reps):
    t1 = time.perf_counter(); run(); times.append(time.perf_counter() - t1)
print(json.dumps({"load_s": load_s, "first_forward_s": first_s, "forward_s": sorted(times)[len(times)//2]}))
"""


def run_child(system, model, n_tok, reps, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", CHILD, system, model, str(n_tok), str(reps),
                        str(threads)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{system} on {model} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--tokens", type=int, default=256, help="forward sequence length")
    ap.add_argument("--reps", type=int, default=5, help="timed forwards after warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        res = {s: run_child(s, model, args.tokens, args.reps, args.threads)
               for s in ("mobiletune", "transformers")}
        rows.append((model, res))
    print(f"\n{time.strftime('%Y-%m-%d')}  forward: 1×{args.tokens} tokens, median of "
          f"{args.reps}, {args.threads} threads\n")
    print("| model | system | load s | forward tok/s | load speed-up | forward ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for model, res in rows:
        ref = res["transformers"]
        for s, r in res.items():
            tps = args.tokens / r["forward_s"]
            print(f"| {model} | {s} | {r['load_s']:.1f} | {tps:.0f} | "
                  f"{ref['load_s'] / r['load_s']:.2f}× | {ref['forward_s'] / r['forward_s']:.2f}× |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"tokens": args.tokens, "results": dict(rows)}, f, indent=2)


if __name__ == "__main__":
    main()
