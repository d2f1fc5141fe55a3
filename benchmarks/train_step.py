"""Desktop LoRA train-step speed and memory: mobiletune (JAX jit) vs transformers + PEFT
(torch CPU), same model, batch, sequence and LoRA targets, each in its own process.

  python benchmarks/train_step.py [--workloads smollm2,gemma3] [--steps 5]

Figures: median seconds per optimizer step after a warm-up step, tokens/s, and the
child's peak RSS. Goal (issue 3): ≥ 1.2× their tokens/s at ≤ their peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKLOADS = {  # name: (model asset, batch, seq, LoRA targets)
    "smollm2": ("smollm2-135m", 4, 128, ["q_proj", "v_proj"]),
    "gemma3": ("gemma3-270m", 8, 64, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}

CHILD = r"""
import json, resource, sys, time
system, model, b, t, targets, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split(","), int(sys.argv[6]), int(sys.argv[7])
import numpy as np
rng = np.random.default_rng(0)
x = rng.integers(100, 5000, (b, t + 1)).astype(np.int32)
times = []
if system == "mobiletune":
    import jax, jax.numpy as jnp
    from mobiletune.loading import load_model
    from mobiletune.lora import LoraConfig
    from mobiletune.optim import OptimConfig
    from mobiletune.recipe import Recipe
    from mobiletune.trainer import build_steps
    r = Recipe(name="bench", model=model, data=("x",), seq_len=t, micro_batch=b, lora=LoraConfig(r=8, alpha=16, target_modules=tuple(targets)), optim=OptimConfig(lr=1e-4))
    m = load_model(model)
    steps, trainable, frozen = build_steps(r, m)
    fns = steps.jitted()
    state = steps.init(trainable)
    batch = {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]), "loss_mask": jnp.ones((b, t), jnp.float32)}
    key = jax.random.PRNGKey(0)
    n_steps = int(sys.argv[6])
    for i in range(n_steps + 1):
        t0 = time.perf_counter()
        acc = fns.accumulate(steps.zero_accum(state.trainable), state.trainable, frozen, batch, key)
        state, loss = fns.apply(state, acc)
        jax.block_until_ready(state.trainable)
        times.append(time.perf_counter() - t0)
else:
    import torch
    torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from mobiletune.loading import resolve_model_path
    p = resolve_model_path(model)
    tm = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    pm = get_peft_model(tm, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    pm.train()
    opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4)
    xi = torch.as_tensor(x[:, :-1], dtype=torch.long); yi = torch.as_tensor(x[:, 1:], dtype=torch.long)
    for i in range(n + 1):
        t0 = time.perf_counter()
        logits = pm(input_ids=xi).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yi.reshape(-1))
        loss.backward(); opt.step(); opt.zero_grad()
        times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": sorted(times[1:])[len(times[1:]) // 2], "first_s": times[0],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(system, model, b, t, targets, steps, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", CHILD, system, model, str(b), str(t), ",".join(targets),
                        str(steps), str(threads)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{system} on {model} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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
        rows[w] = {s: run_child(s, model, b, t, targets, args.steps, args.threads)
                   for s in ("mobiletune", "transformers+peft")}
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
