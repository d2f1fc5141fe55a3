"""Llama layout (SmolLM2) and Qwen 2.5 (the same layout plus q/k/v biases).

  h = embed_tokens[tokens]
  per layer:  h += o_proj(attn(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))
              h += down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
  logits = lm_head(rms(h))            (lm_head = embed_tokens when tied)
"""

from __future__ import annotations

import jax.numpy as jnp

from mobiletune import families
from mobiletune.models import layers as L
from mobiletune.models.config import ModelConfig


def embed(params, cfg: ModelConfig, tokens, positions):
    return params[families.spec(cfg.family).embed][tokens]            # (B, T, D)


def block(lp, cfg: ModelConfig, i: int, h, positions, layer_cache=None, lora=None):
    """One decoder layer. lp holds this layer's params with names relative to the layer."""
    dense = L.denses(lp, lora, cfg.matmul)
    nh, kh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = L.rms_norm(h, lp["input_layernorm.weight"], cfg.norm_eps)
    q = L.split_heads(dense("self_attn.q_proj", x), nh, hd)
    k = L.split_heads(dense("self_attn.k_proj", x), kh, hd)
    v = L.split_heads(dense("self_attn.v_proj", x), kh, hd)
    q = L.rope(q, positions, cfg.rope_theta)                           # (B, T, H, Dh)
    k = L.rope(k, positions, cfg.rope_theta)                           # (B, T, K, Dh)
    a, new_kv = L.attend_with_cache(q, k, v, positions, layer_cache, scale=hd ** -0.5)
    h = h + dense("self_attn.o_proj", L.merge_heads(a))
    x = L.rms_norm(h, lp["post_attention_layernorm.weight"], cfg.norm_eps)
    act = L.activation(cfg.hidden_act)
    gate = dense("mlp.gate_proj", x)
    up = dense("mlp.up_proj", x)
    h = h + dense("mlp.down_proj", act(gate) * up)
    return h, new_kv


def final_norm(params, cfg: ModelConfig, h):
    (weight,) = families.spec(cfg.family).final_norm
    return L.rms_norm(h, params[weight], cfg.norm_eps)


def output_weight(params, cfg: ModelConfig):
    """The (V, D) unembedding matrix."""
    return params[families.spec(cfg.family).output_name(cfg)]


def init_layer(cfg: ModelConfig, name: str, shape, key, std: float = 0.02):
    import jax
    if name.endswith("norm.weight"):
        return jnp.ones(shape, jnp.float32)
    if name.endswith(".bias"):
        return jnp.zeros(shape, jnp.float32)
    return std * jax.random.normal(key, shape, jnp.float32)
