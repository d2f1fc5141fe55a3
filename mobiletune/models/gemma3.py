"""Gemma 3 text model.

  h = embed_tokens[tokens] * sqrt(D)
  per layer (sliding-window "local" or "global" attention, each with its own RoPE base):
      a = attn(rope(q_norm(q_proj(n))), rope(k_norm(k_proj(n))), v_proj(n)),  n = in_norm(h)
      h += post_attention_norm(o_proj(a))
      h += post_feedforward_norm(down(gelu_tanh(gate(m)) * up(m))),  m = pre_ff_norm(h)
  logits = softcap(norm(h) @ embed_tokens.T)
Every RMSNorm multiplies by (1 + w). Attention scores are scaled by
query_pre_attn_scalar ** -0.5, optionally soft-capped.
"""

from __future__ import annotations

import jax.numpy as jnp

from mobiletune import families
from mobiletune.models import layers as L
from mobiletune.models.config import ModelConfig
from mobiletune.models.llama import output_weight  # noqa: F401


def embed(params, cfg: ModelConfig, tokens, positions):
    spec = families.spec(cfg.family)
    scale = jnp.asarray(spec.embed_scale(cfg), jnp.float32)               # sqrt(D)
    return params[spec.embed][tokens] * scale                             # (B, T, D)


def block(lp, cfg: ModelConfig, i: int, h, positions, layer_cache=None, lora=None, attn=None):
    """One layer; ``attn`` overrides the spec's ``attention_kind(cfg, i)`` (the sharded
    export passes it as signature inputs so that local and global layers share one program)."""
    dense = L.denses(lp, lora, cfg.matmul)
    nh, kh, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps
    norm = lambda x, name: L.rms_norm(x, lp[name], eps, plus_one=True)  # noqa: E731
    x = norm(h, "input_layernorm.weight")
    q = L.split_heads(dense("self_attn.q_proj", x), nh, hd)
    k = L.split_heads(dense("self_attn.k_proj", x), kh, hd)
    v = L.split_heads(dense("self_attn.v_proj", x), kh, hd)
    q = norm(q, "self_attn.q_norm.weight")                                # (B, T, H, Dh)
    k = norm(k, "self_attn.k_norm.weight")                                # (B, T, K, Dh)
    if attn is None:
        attn = families.spec(cfg.family).attention_kind(cfg, i)
    theta, factor, window = attn
    q = L.rope(q, positions, theta, factor)
    k = L.rope(k, positions, theta, factor)
    a, new_kv = L.attend_with_cache(q, k, v, positions, layer_cache,
                                    scale=cfg.query_pre_attn_scalar ** -0.5, window=window,
                                    softcap=cfg.attn_logit_softcapping)
    a = dense("self_attn.o_proj", L.merge_heads(a))
    h = h + norm(a, "post_attention_layernorm.weight")
    x = norm(h, "pre_feedforward_layernorm.weight")
    act = L.activation(cfg.hidden_act)
    m = act(dense("mlp.gate_proj", x)) * dense("mlp.up_proj", x)
    h = h + norm(dense("mlp.down_proj", m), "post_feedforward_layernorm.weight")
    return h, new_kv


def final_norm(params, cfg: ModelConfig, h):
    (weight,) = families.spec(cfg.family).final_norm
    return L.rms_norm(h, params[weight], cfg.norm_eps, plus_one=True)


def init_layer(cfg: ModelConfig, name: str, shape, key, std: float = 0.02):
    import jax
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return jnp.zeros(shape, jnp.float32)  # (1 + w) norms start at identity
    return std * jax.random.normal(key, shape, jnp.float32)
