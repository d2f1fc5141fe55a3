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


@partial(jax.jit, static_argnums=(2, 3))
def _side_step(side, params, cfg, scfg, tokens, last):
    from mobiletune.models.side import side_logits
    return side_logits(side, params, cfg, scfg, tokens)[0, last]                # (V,)


def generate_side(side, params, cfg, scfg, prompt_ids, max_new_tokens: int = 32,
                  temperature: float = 0.0, seed: int = 0, stop_ids=()) -> list[int]:
    """As ``generate``, through backbone + side network (``models.side``); the side network
    has its own attention and no cache here, so each token recomputes the padded window."""
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    n = len(prompt_ids) + max_new_tokens
    if n > cfg.max_position:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's {cfg.max_position} positions")
    rng = np.random.default_rng(seed)
    ids, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        window = jnp.asarray([ids + [0] * (n - len(ids))], jnp.int32)
        tok = sample(np.asarray(_side_step(side, params, cfg, scfg, window, len(ids) - 1)),
                     temperature, rng)
        out.append(tok)
        if tok in stop_ids:
            break
        ids.append(tok)
    return out
