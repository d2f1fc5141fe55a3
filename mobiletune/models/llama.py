"""Llama layout (SmolLM2) and Qwen 2.5 (the same layout plus q/k/v biases).

  h = embed_tokens[tokens]
  per layer:  h += o_proj(attn(rope(q_proj(rms(h))), rope(k_proj(rms(h))), v_proj(rms(h))))
              h += down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
  logits = lm_head(rms(h))            (lm_head = embed_tokens when tied)
"""

from __future__ import annotations

import jax.numpy as jnp

from mobiletune.models import layers as L
from mobiletune.models.config import ModelConfig


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qd, kd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    s = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
         "self_attn.q_proj.weight": (qd, d), "self_attn.k_proj.weight": (kd, d),
         "self_attn.v_proj.weight": (kd, d), "self_attn.o_proj.weight": (d, qd),
         "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
         "mlp.down_proj.weight": (d, f)}
    if cfg.attention_bias:
        s.update({"self_attn.q_proj.bias": (qd,), "self_attn.k_proj.bias": (kd,),
                  "self_attn.v_proj.bias": (kd,)})
        if cfg.family == "llama":  # llama's attention_bias also covers o_proj; qwen2's not
            s["self_attn.o_proj.bias"] = (d,)
    if cfg.mlp_bias:
        s.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,),
                  "mlp.down_proj.bias": (d,)})
    return s


def decoder_param_shapes(cfg: ModelConfig, layer: dict[str, tuple]) -> dict[str, tuple]:
    """The ``model.embed_tokens / model.layers.N.* / model.norm / lm_head`` layout that
    Llama, Qwen2 and Gemma 3 share, given one layer's shapes."""
    s = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
         "model.norm.weight": (cfg.hidden_size,)}
    for i in range(cfg.num_layers):
        s.update({f"{layer_prefix(i)}{k}": v for k, v in layer.items()})
    if not cfg.tie_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return s


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    return decoder_param_shapes(cfg, layer_shapes(cfg))


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def embed(params, cfg: ModelConfig, tokens, positions):
    return params["model.embed_tokens.weight"][tokens]                 # (B, T, D)


def block(lp, cfg: ModelConfig, i: int, h, positions, layer_cache=None, lora=None):
    """One decoder layer. lp holds this layer's params with names relative to the layer."""
    nh, kh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = L.rms_norm(h, lp["input_layernorm.weight"], cfg.norm_eps)
    q = L.split_heads(L.dense(lp, "self_attn.q_proj", x, lora), nh, hd)
    k = L.split_heads(L.dense(lp, "self_attn.k_proj", x, lora), kh, hd)
    v = L.split_heads(L.dense(lp, "self_attn.v_proj", x, lora), kh, hd)
    q = L.rope(q, positions, cfg.rope_theta)                           # (B, T, H, Dh)
    k = L.rope(k, positions, cfg.rope_theta)                           # (B, T, K, Dh)
    a, new_kv = L.attend_with_cache(q, k, v, positions, layer_cache, scale=hd ** -0.5)
    h = h + L.dense(lp, "self_attn.o_proj", L.merge_heads(a), lora)
    x = L.rms_norm(h, lp["post_attention_layernorm.weight"], cfg.norm_eps)
    act = L.activation(cfg.hidden_act)
    gate = L.dense(lp, "mlp.gate_proj", x, lora)
    up = L.dense(lp, "mlp.up_proj", x, lora)
    h = h + L.dense(lp, "mlp.down_proj", act(gate) * up, lora)
    return h, new_kv


def final_norm(params, cfg: ModelConfig, h):
    return L.rms_norm(h, params["model.norm.weight"], cfg.norm_eps)


def output_weight(params, cfg: ModelConfig):
    """The (V, D) unembedding matrix."""
    return params["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]


def init_layer(cfg: ModelConfig, name: str, shape, key, std: float = 0.02):
    import jax
    if name.endswith("norm.weight"):
        return jnp.ones(shape, jnp.float32)
    if name.endswith(".bias"):
        return jnp.zeros(shape, jnp.float32)
    return std * jax.random.normal(key, shape, jnp.float32)
