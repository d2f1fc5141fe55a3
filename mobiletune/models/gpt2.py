"""GPT-2: learned absolute positions, pre-LayerNorm blocks, Conv1D weights stored (in, out),
a fused c_attn producing q, k, v, GELU (tanh) MLP, head tied to the token embedding.

  h = wte[tokens] + wpe[positions]
  per layer:  h += c_proj(attn(split(c_attn(ln_1(h)))))
              h += mlp.c_proj(gelu(mlp.c_fc(ln_2(h))))
  logits = ln_f(h) @ wte.T
"""

from __future__ import annotations

import jax.numpy as jnp

from mobiletune.models import layers as L
from mobiletune.models.config import ModelConfig


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,),
            "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,)}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d = cfg.hidden_size
    s = {"transformer.wte.weight": (cfg.vocab_size, d),
         "transformer.wpe.weight": (cfg.max_position, d),
         "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    for i in range(cfg.num_layers):
        s.update({f"transformer.h.{i}.{k}": v for k, v in layer_shapes(cfg).items()})
    if not cfg.tie_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, d)
    return s


def layer_prefix(i: int) -> str:
    return f"transformer.h.{i}."


def embed(params, cfg: ModelConfig, tokens, positions):
    return params["transformer.wte.weight"][tokens] + params["transformer.wpe.weight"][positions]


def block(lp, cfg: ModelConfig, i: int, h, positions, layer_cache=None, lora=None):
    nh, hd, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    x = L.layer_norm(h, lp["ln_1.weight"], lp["ln_1.bias"], cfg.norm_eps)
    qkv = L.dense(lp, "attn.c_attn", x, lora, conv1d_layout=True)    # (B, T, 3D)
    q, k, v = (L.split_heads(qkv[..., j * d:(j + 1) * d], nh, hd) for j in range(3))
    a, new_kv = L.attend_with_cache(q, k, v, positions, layer_cache, scale=hd ** -0.5)
    h = h + L.dense(lp, "attn.c_proj", L.merge_heads(a), lora, conv1d_layout=True)
    x = L.layer_norm(h, lp["ln_2.weight"], lp["ln_2.bias"], cfg.norm_eps)
    x = L.activation(cfg.hidden_act)(L.dense(lp, "mlp.c_fc", x, lora, conv1d_layout=True))
    h = h + L.dense(lp, "mlp.c_proj", x, lora, conv1d_layout=True)
    return h, new_kv


def final_norm(params, cfg: ModelConfig, h):
    return L.layer_norm(h, params["transformer.ln_f.weight"], params["transformer.ln_f.bias"],
                        cfg.norm_eps)


def output_weight(params, cfg: ModelConfig):
    return params["transformer.wte.weight" if cfg.tie_embeddings else "lm_head.weight"]


def init_layer(cfg: ModelConfig, name: str, shape, key, std: float = 0.02):
    import jax
    if name.endswith((".bias",)):
        return jnp.zeros(shape, jnp.float32)
    if "ln_" in name:
        return jnp.ones(shape, jnp.float32)
    if name.endswith("c_proj.weight"):  # GPT-2 scales residual projections by 1/sqrt(2L)
        std = std / (2 * cfg.num_layers) ** 0.5
    return std * jax.random.normal(key, shape, jnp.float32)
