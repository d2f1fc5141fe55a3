"""Autoregressive generation with a KV cache: one jitted prefill over the prompt, then one
jitted single-token step (fixed shapes, compiled once) per new token."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune import models
from mobiletune.runtime.sampling import sample


@partial(jax.jit, static_argnums=(1, 4))
def _step(params, cfg, tokens, cache, lora=None):
    logits, cache = models.forward(params, cfg, tokens, cache, lora)
    return logits[:, -1], cache                                        # (B, V)


def generate(params, cfg, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int = 0, stop_ids=(), on_token=None, lora=None) -> list[int]:
    """New token ids after ``prompt_ids`` (stops early at any of ``stop_ids``)."""
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    max_len = len(prompt_ids) + max_new_tokens
    if max_len > cfg.max_position:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's {cfg.max_position} positions")
    rng = np.random.default_rng(seed)
    cache = models.new_cache(cfg, batch=1, max_len=max_len)
    logits, cache = _step(params, cfg, jnp.asarray([prompt_ids], jnp.int32), cache, lora)
    out = []
    for _ in range(max_new_tokens):
        tok = sample(np.asarray(logits[0]), temperature, rng)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in stop_ids:
            break
        logits, cache = _step(params, cfg, jnp.asarray([[tok]], jnp.int32), cache, lora)
    return out
