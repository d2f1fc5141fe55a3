"""One desktop system's training step, timed in this (fresh) process.

  python benchmarks/child.py '{"system": "jax", "model": "gemma3-270m", "batch": 8,
                               "seq": 64, "lora": {"r": 8, "alpha": 16,
                               "targets": ["q_proj", "v_proj"]}, "steps": 5, "threads": 2}'

``system``: ``jax`` (mobiletune's jit-compiled ``train_step``, the state donated, as
``mobiletune train`` runs a step of one micro-batch) or ``torch`` (transformers + PEFT on
torch CPU with ``threads`` threads, AdamW over the trainable parameters). ``lora``: null
for full fine-tuning; ``targets`` null for PEFT's default targets of the model family.
``model``: anything ``load_model`` accepts; for ``preset:<name>`` torch builds the
transformers model from ``ModelConfig.to_hf_dict()`` with its own random init, for an HF
directory or GGUF it loads the same weights.

``profile``: N (optional, jax only) also traces N more steps (``xla_trace``).

Prints one JSON line: ``times`` (seconds of every step, the first is the warm-up, which
includes compilation), ``step_s`` (median of the rest), ``params`` and
``trainable_params``. Peak RSS is measured by the parent (``common.run``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import common  # noqa: F401  (puts the repository on sys.path)
import numpy as np


def batch_tokens(vocab: int, b: int, t: int) -> np.ndarray:
    """(b, t + 1) token ids, the same for every system."""
    return np.random.default_rng(0).integers(100, min(5000, vocab), (b, t + 1)).astype(np.int32)


def time_jax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp

    from mobiletune.formats.loading import load_model
    from mobiletune.models.lora import LoraConfig
    from mobiletune.train.optim import OptimConfig
    from mobiletune.train.recipe import Recipe
    from mobiletune.train.setup import build_steps
    b, t, lo = spec["batch"], spec["seq"], spec["lora"]
    lora = None if lo is None else LoraConfig(r=lo["r"], alpha=lo["alpha"],
                                              target_modules=_tuple(lo["targets"]))
    r = Recipe(name="bench", model=spec["model"], data=("unused",), seq_len=t, micro_batch=b,
               lora=lora, optim=OptimConfig(lr=1e-4))
    m = load_model(spec["model"])
    cfg = m.cfg
    steps, trainable, frozen = build_steps(r, m)
    fns = steps.jitted()
    n_tr = sum(int(np.prod(v.shape)) for v in trainable.values())
    state = steps.init(trainable)
    x = batch_tokens(cfg.vocab_size, b, t)
    batch = {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
             "loss_mask": jnp.ones((b, t), jnp.float32)}
    key = jax.random.PRNGKey(0)
    times = []
    for _ in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        state, loss = fns.train_step(state, frozen, batch, key)
        jax.block_until_ready(state.trainable)
        times.append(time.perf_counter() - t0)
    n_fr = sum(int(np.prod(v.shape)) for v in frozen.values())
    out = {"times": times, "params": n_fr + (0 if lora else n_tr), "trainable_params": n_tr,
           "loss": float(loss)}
    if spec.get("profile"):
        out["profile"] = profile_jax(fns.train_step, state, (frozen, batch, key), spec["profile"])
    return out


def profile_jax(step, state, args, steps: int) -> dict:
    """``steps`` more steps under ``jax.profiler``, summed by ``xla_trace``, and XLA's
    FLOP count of one step."""
    import tempfile

    import jax
    import xla_trace
    compiled = step.lower(state, *args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    with tempfile.TemporaryDirectory(prefix="mobiletune-trace-") as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            state, _ = step(state, *args)
            jax.block_until_ready(state.trainable)
        jax.profiler.stop_trace()
        return {**xla_trace.summarize(d, compiled.as_text(), steps), "flops": cost.get("flops")}


def torch_model(spec: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mobiletune.formats.loading import resolve_model_path
    if spec.startswith("preset:"):
        from mobiletune.models.config import preset
        hf = preset(spec.split(":", 1)[1]).to_hf_dict()
        hf.pop("architectures", None)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf),
                                                dtype=torch.float32)
    p = resolve_model_path(spec)
    if p.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)


def time_torch(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    b, t, lo = spec["batch"], spec["seq"], spec["lora"]
    model = torch_model(spec["model"])
    n_all = sum(p.numel() for p in model.parameters())
    if lo is not None:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lo["r"], lora_alpha=lo["alpha"],
                                                 target_modules=lo["targets"], task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    x = batch_tokens(model.config.vocab_size, b, t)
    xi = torch.as_tensor(x[:, :-1], dtype=torch.long)
    yi = torch.as_tensor(x[:, 1:], dtype=torch.long)
    times = []
    for _ in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        logits = model(input_ids=xi).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yi.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return {"times": times, "params": n_all, "trainable_params": sum(p.numel() for p in trainable),
            "loss": float(loss)}


def _tuple(x):
    return tuple(x) if isinstance(x, list) else x


def main(argv) -> None:
    spec = json.loads(argv[0])
    res = {"jax": time_jax, "torch": time_torch}[spec["system"]](spec)
    res["step_s"] = statistics.median(res["times"][1:]) if len(res["times"]) > 1 else res["times"][0]
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
