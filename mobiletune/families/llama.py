"""Llama (SmolLM2): RoPE, RMSNorm, SwiGLU, GQA; ``model.embed_tokens / model.layers.N /
model.norm / lm_head``, the decoder layout Qwen2 and Gemma 3 share. Math:
``mobiletune/models/llama.py``."""

from __future__ import annotations

from mobiletune.families.config import ConfigError, ModelConfig, first, hf_rope_factor, hf_rope_theta
from mobiletune.families.spec import FamilySpec, GGUFSpec, Preset

# The decoder layout's outer names (shared with qwen2 and gemma3).
LAYER_PREFIX = "model.layers.{i}."
EMBED = "model.embed_tokens.weight"
FINAL_NORM = ("model.norm.weight",)


def layer_shapes(cfg: ModelConfig, o_proj_bias: bool = True) -> dict[str, tuple]:
    """One layer; ``o_proj_bias``: llama's attention_bias also covers o_proj (qwen2's not)."""
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
        if o_proj_bias:
            s["self_attn.o_proj.bias"] = (d,)
    if cfg.mlp_bias:
        s.update({"mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,),
                  "mlp.down_proj.bias": (d,)})
    return s


def from_hf(hf: dict, family: str = "llama", tie_default: bool = False,
            qkv_bias: bool | None = None) -> ModelConfig:
    """``qkv_bias``: fixed by the family (qwen2: True) or, None, read from attention_bias."""
    nh = hf["num_attention_heads"]
    if hf.get("rope_scaling") and hf_rope_factor(hf) != 1.0:
        raise ConfigError("llama rope_scaling is not supported")
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=nh,
        num_kv_heads=hf.get("num_key_value_heads") or nh,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // nh,
        intermediate_size=hf["intermediate_size"],
        max_position=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", tie_default),
        attention_bias=hf.get("attention_bias", False) if qkv_bias is None else qkv_bias,
        mlp_bias=hf.get("mlp_bias", False), rope_theta=hf_rope_theta(hf),
        hidden_act=hf.get("hidden_act", SPEC.hidden_act),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=first(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"))


def decoder_to_hf(c: ModelConfig) -> dict:
    """The config.json keys llama and qwen2 share."""
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "max_position_embeddings": c.max_position,
            "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "tie_word_embeddings": c.tie_embeddings, "hidden_act": c.hidden_act,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id, "attention_dropout": 0.0}


def to_hf(c: ModelConfig) -> dict:
    return {**decoder_to_hf(c), "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias}


# llama.cpp's block tensor names for this layout (gemma3 adds its extra norms)
GGUF_BLOCKS = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

SPEC = FamilySpec(
    name="llama", hf_model_types=("llama",), hf_architecture="LlamaForCausalLM",
    math="mobiletune.models.llama", layer_prefix=LAYER_PREFIX, layer_shapes=layer_shapes,
    embed=EMBED, final_norm=FINAL_NORM, hidden_act="silu", from_hf=from_hf, to_hf=to_hf,
    peft_default_targets=("q_proj", "v_proj"), no_decay_markers=("norm", "bias", "embed_tokens"),
    presets={
        "smollm2-135m": Preset(dict(vocab_size=49152, hidden_size=576, num_layers=30,
                                    num_heads=9, num_kv_heads=3, head_dim=64,
                                    intermediate_size=1536, max_position=8192, norm_eps=1e-5,
                                    tie_embeddings=True, rope_theta=100000.0, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=2), "smollm2-135m"),
    },
    gguf=GGUFSpec(
        arch="llama", blocks=GGUF_BLOCKS, eps_key="attention.layer_norm_rms_epsilon",
        head_dim_keys=("attention.key_length", "rope.dimension_count"),
        permuted={"self_attn.q_proj": "num_heads", "self_attn.k_proj": "num_kv_heads"},
        config=lambda meta, kw: dict(attention_bias="blk.0.attn_q.bias" in meta.tensors,
                                     mlp_bias="blk.0.ffn_up.bias" in meta.tensors)),
)
