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

from mobiletune.models import layers as L
from mobiletune.models.config import ModelConfig
from mobiletune.models.llama import decoder_param_shapes, layer_prefix, output_weight  # noqa: F401


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qd, kd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    s = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
         "pre_feedforward_layernorm.weight": (d,), "post_feedforward_layernorm.weight": (d,),
         "self_attn.q_proj.weight": (qd, d), "self_attn.k_proj.weight": (kd, d),
         "self_attn.v_proj.weight": (kd, d), "self_attn.o_proj.weight": (d, qd),
         "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
         "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
         "mlp.down_proj.weight": (d, f)}
    if cfg.attention_bias:
        s.update({"self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kd,),
                  "self_attn.v_proj.bias": (kd,), "self_attn.o_proj.bias": (d,)})
    return s


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    return decoder_param_shapes(cfg, layer_shapes(cfg))


def embed(params, cfg: ModelConfig, tokens, positions):
    scale = jnp.asarray(cfg.hidden_size ** 0.5, jnp.float32)
    return params["model.embed_tokens.weight"][tokens] * scale            # (B, T, D)


def is_sliding(cfg: ModelConfig, i: int) -> bool:
    return cfg.layer_types[i] == "sliding_attention"


def attention_kind(cfg: ModelConfig, i: int) -> tuple:
    """(RoPE base, RoPE linear scaling factor, sliding window or None) of layer i."""
    if is_sliding(cfg, i):
        return cfg.rope_local_theta, 1.0, cfg.sliding_window
    return cfg.rope_theta, cfg.rope_scaling_factor, None


def block(lp, cfg: ModelConfig, i: int, h, positions, layer_cache=None, lora=None, attn=None):
    """One layer; ``attn`` overrides ``attention_kind(cfg, i)`` (the sharded export passes
    it as signature inputs so that local and global layers share one program)."""
    nh, kh, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps
    norm = lambda x, name: L.rms_norm(x, lp[name], eps, plus_one=True)  # noqa: E731
    x = norm(h, "input_layernorm.weight")
    q = L.split_heads(L.dense(lp, "self_attn.q_proj", x, lora), nh, hd)
    k = L.split_heads(L.dense(lp, "self_attn.k_proj", x, lora), kh, hd)
    v = L.split_heads(L.dense(lp, "self_attn.v_proj", x, lora), kh, hd)
    q = norm(q, "self_attn.q_norm.weight")                                # (B, T, H, Dh)
    k = norm(k, "self_attn.k_norm.weight")                                # (B, T, K, Dh)
    theta, factor, window = attention_kind(cfg, i) if attn is None else attn
    q = L.rope(q, positions, theta, factor)
    k = L.rope(k, positions, theta, factor)
    a, new_kv = L.attend_with_cache(q, k, v, positions, layer_cache,
                                    scale=cfg.query_pre_attn_scalar ** -0.5, window=window,
                                    softcap=cfg.attn_logit_softcapping)
    a = L.dense(lp, "self_attn.o_proj", L.merge_heads(a), lora)
    h = h + norm(a, "post_attention_layernorm.weight")
    x = norm(h, "pre_feedforward_layernorm.weight")
    act = L.activation(cfg.hidden_act)
    m = act(L.dense(lp, "mlp.gate_proj", x, lora)) * L.dense(lp, "mlp.up_proj", x, lora)
    h = h + norm(L.dense(lp, "mlp.down_proj", m, lora), "post_feedforward_layernorm.weight")
    return h, new_kv


def final_norm(params, cfg: ModelConfig, h):
    return L.rms_norm(h, params["model.norm.weight"], cfg.norm_eps, plus_one=True)


def init_layer(cfg: ModelConfig, name: str, shape, key, std: float = 0.02):
    import jax
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return jnp.zeros(shape, jnp.float32)  # (1 + w) norms start at identity
    return std * jax.random.normal(key, shape, jnp.float32)
