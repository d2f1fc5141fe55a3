"""Model families as pure functions over flat parameter dicts.

Params are a flat ``dict[str, Array]`` whose keys are exactly the Hugging Face state-dict
names and whose arrays have Hugging Face shapes and layouts, so checkpoints load and save
without renaming, LoRA targets modules by their PEFT names, and the phone's state files
use the same keys.

Names, shapes and layer prefixes come from the family's spec (``mobiletune.families``);
its math module (the spec's ``math``: ``embed``, ``block``, ``final_norm``,
``output_weight``, ``init_layer``) is composed here into ``forward`` (optionally with a KV
cache) and ``init_params``.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune import families
from mobiletune.models.config import ModelConfig, preset  # noqa: F401
from mobiletune.models.layers import KVCache, LoraCtx, matmul_t


def family(cfg: ModelConfig):
    """The math module of ``cfg``'s family (named by its spec)."""
    return importlib.import_module(families.spec(cfg.family).math)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """HF name -> shape for every parameter of the model."""
    return families.spec(cfg.family).param_shapes(cfg)


def init_params(cfg: ModelConfig, key, as_numpy: bool = False) -> dict:
    """Random init in the HF layout (normal(0.02) weights, zero biases, identity norms).
    ``as_numpy`` converts each tensor as it is made (peak memory: one copy of the model)."""
    fam = family(cfg)
    shapes = param_shapes(cfg)
    keys = jax.random.split(key, len(shapes))
    out = {}
    for (name, shape), k in zip(sorted(shapes.items()), keys):
        v = fam.init_layer(cfg, name, shape, k)
        out[name] = np.asarray(v) if as_numpy else v
    return out


def layer_params(params: dict, cfg: ModelConfig, i: int) -> dict:
    """Layer i's params with names relative to the layer (e.g. ``self_attn.q_proj.weight``)."""
    prefix = families.spec(cfg.family).prefix(i)
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def hidden_states(params, cfg: ModelConfig, tokens, cache: KVCache | None = None,
                  lora: LoraCtx | None = None):
    """Final-normed hidden states (B, T, D) and the updated cache (or None).

    ``params`` may also hold LoRA tensors (``<module>.lora_A.weight`` / ``.lora_B.weight``);
    they are applied when ``lora`` gives their scale (see ``mobiletune.models.lora``)."""
    fam = family(cfg)
    start = 0 if cache is None else cache.length
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)      # (T,)
    h = fam.embed(params, cfg, tokens, positions)                          # (B, T, D)
    new_k, new_v = [], []
    for i in range(cfg.num_layers):
        lc = None if cache is None else (cache.k[i], cache.v[i], cache.length)
        lctx = lora
        if lora is not None and lora.key is not None:
            lctx = lora._replace(key=jax.random.fold_in(lora.key, i))
        h, kv = fam.block(layer_params(params, cfg, i), cfg, i, h, positions, lc, lctx)
        if kv is not None:
            new_k.append(kv[0])
            new_v.append(kv[1])
    if cache is not None:
        cache = KVCache(tuple(new_k), tuple(new_v), cache.length + tokens.shape[1])
    return fam.final_norm(params, cfg, h), cache


def unembed(params, cfg: ModelConfig, h):
    """(B, T, D) final hidden -> (B, T, V) logits, soft-capped where the config says."""
    logits = matmul_t(h, family(cfg).output_weight(params, cfg), cfg.matmul)          # (B, T, V)
    if cfg.final_logit_softcapping is not None:
        c = cfg.final_logit_softcapping
        logits = jnp.tanh(logits / c) * c
    return logits


def forward(params, cfg: ModelConfig, tokens, cache: KVCache | None = None,
            lora: LoraCtx | None = None):
    """tokens (B, T) int32 -> logits (B, T, V) float32 and the updated cache (or None)."""
    h, cache = hidden_states(params, cfg, tokens, cache, lora)
    return unembed(params, cfg, h), cache


def new_cache(cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
    return KVCache.zeros(cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
