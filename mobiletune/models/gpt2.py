"""GPT-2: learned absolute positions, pre-LayerNorm blocks, Conv1D weights stored (in, out),
a fused c_attn producing q, k, v, GELU (tanh) MLP, head tied to the token embedding.

  h = wte[tokens] + wpe[positions]
  per layer:  h += c_proj(attn(split(c_attn(ln_1(h)))))
              h += mlp.c_proj(gelu(mlp.c_fc(ln_2(h))))
  logits = ln_f(h) @ wte.T
"""

from __future__ import annotations

import jax.numpy as jnp

from mobiletune import families
from mobiletune.models import layers as L
from mobiletune.models.config import ModelConfig


def embed(params, cfg: ModelConfig, tokens, positions):
    spec = families.spec(cfg.family)
    return params[spec.embed][tokens] + params[spec.positions][positions]   # (B, T, D)


def block(lp, cfg: ModelConfig, i: int, h, positions, layer_cache=None, lora=None):
    dense = L.denses(lp, lora, cfg.matmul, conv1d_layout=True)
    nh, hd, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    x = L.layer_norm(h, lp["ln_1.weight"], lp["ln_1.bias"], cfg.norm_eps)
    qkv = dense("attn.c_attn", x)    # (B, T, 3D)
    q, k, v = (L.split_heads(qkv[..., j * d:(j + 1) * d], nh, hd) for j in range(3))
    a, new_kv = L.attend_with_cache(q, k, v, positions, layer_cache, scale=hd ** -0.5)
    h = h + dense("attn.c_proj", L.merge_heads(a))
    x = L.layer_norm(h, lp["ln_2.weight"], lp["ln_2.bias"], cfg.norm_eps)
    x = L.activation(cfg.hidden_act)(dense("mlp.c_fc", x))
    h = h + dense("mlp.c_proj", x)
    return h, new_kv


def final_norm(params, cfg: ModelConfig, h):
    weight, bias = families.spec(cfg.family).final_norm
    return L.layer_norm(h, params[weight], params[bias], cfg.norm_eps)


def output_weight(params, cfg: ModelConfig):
    return params[families.spec(cfg.family).output_name(cfg)]


def init_layer(cfg: ModelConfig, name: str, shape, key, std: float = 0.02):
    import jax
    if name.endswith((".bias",)):
        return jnp.zeros(shape, jnp.float32)
    if "ln_" in name:
        return jnp.ones(shape, jnp.float32)
    if name.endswith("c_proj.weight"):  # GPT-2 scales residual projections by 1/sqrt(2L)
        std = std / (2 * cfg.num_layers) ** 0.5
    return std * jax.random.normal(key, shape, jnp.float32)
