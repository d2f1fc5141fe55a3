"""Gemma 3 text model: sqrt(D)-scaled embedding, (1 + w) RMSNorms (q/k norms, sandwich
norms), GeGLU (tanh GELU), interleaved sliding-window ("local") and global layers with their
own RoPE bases; the llama decoder layout. Math: ``mobiletune/models/gemma3.py``."""

from __future__ import annotations

from mobiletune.families import llama
from mobiletune.families.config import ModelConfig, first, hf_rope_factor, hf_rope_theta
from mobiletune.families.spec import FamilySpec, GGUFSpec, Preset


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


def layer_types(n: int, pattern: int = 6) -> tuple[str, ...]:
    """Every ``pattern``-th layer global, the others sliding-window (Gemma 3's default)."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n))


def attention_kind(cfg: ModelConfig, i: int) -> tuple:
    """(RoPE base, RoPE linear scaling factor, sliding window or None) of layer i."""
    if cfg.layer_types[i] == "sliding_attention":
        return cfg.rope_local_theta, 1.0, cfg.sliding_window
    return cfg.rope_theta, cfg.rope_scaling_factor, None


def from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type") == "gemma3" and "text_config" in hf:  # the multimodal config
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or layer_types(n, hf.get("sliding_window_pattern", 6))
    nh = hf["num_attention_heads"]
    hd = hf.get("head_dim", 256)
    return ModelConfig(
        family="gemma3", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=n, num_heads=nh, num_kv_heads=hf.get("num_key_value_heads", nh),
        head_dim=hd, intermediate_size=hf["intermediate_size"],
        max_position=hf.get("max_position_embeddings", 32768),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        attention_bias=hf.get("attention_bias", False),
        rope_theta=hf_rope_theta(hf, "full_attention", 1_000_000.0),
        rope_scaling_factor=hf_rope_factor(hf, "full_attention"),
        rope_local_theta=hf_rope_theta(hf, "sliding_attention", 10000.0),
        sliding_window=hf.get("sliding_window", 512), layer_types=tuple(types),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", hd),
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or SPEC.hidden_act,
        bos_token_id=hf.get("bos_token_id", 2), eos_token_id=first(hf.get("eos_token_id", 1)),
        pad_token_id=hf.get("pad_token_id", 0))


def to_hf(c: ModelConfig) -> dict:
    full = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor != 1.0:
        full = {"rope_type": "linear", "rope_theta": c.rope_theta,
                "factor": c.rope_scaling_factor}
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
            "head_dim": c.head_dim, "max_position_embeddings": c.max_position,
            "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "rope_local_base_freq": c.rope_local_theta,
            "rope_scaling": None if c.rope_scaling_factor == 1.0 else
            {"rope_type": "linear", "factor": c.rope_scaling_factor},
            "rope_parameters": {"full_attention": full, "sliding_attention":
                                {"rope_type": "default", "rope_theta": c.rope_local_theta}},
            "sliding_window": c.sliding_window, "layer_types": list(c.layer_types),
            "query_pre_attn_scalar": c.query_pre_attn_scalar,
            "attn_logit_softcapping": c.attn_logit_softcapping,
            "final_logit_softcapping": c.final_logit_softcapping,
            "hidden_activation": c.hidden_act, "tie_word_embeddings": c.tie_embeddings,
            "attention_bias": c.attention_bias, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "attention_dropout": 0.0}


def gguf_config(meta, kw: dict) -> dict:
    """llama.cpp hard-codes what the file does not say: every 6th layer global, local RoPE
    base 10000, and queries scaled by head_dim ** -0.5 (hidden/heads for the 62-layer 27B)."""
    n = kw["num_layers"]
    pattern = meta.raw("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        types = tuple("sliding_attention" if s else "full_attention" for s in pattern)
    else:
        types = layer_types(n, pattern) if pattern else ("sliding_attention",) * n
    return dict(layer_types=types, rope_local_theta=meta.f32("rope.freq_base_swa", 10000.0),
                sliding_window=int(meta.get("attention.sliding_window", 512)),
                query_pre_attn_scalar=(kw["hidden_size"] // kw["num_heads"] if n == 62
                                       else kw["head_dim"]),
                attn_logit_softcapping=meta.get("attn_logit_softcapping", None),
                final_logit_softcapping=meta.get("final_logit_softcapping", None),
                attention_bias="blk.0.attn_q.bias" in meta.tensors)


_GEMMA3 = dict(vocab_size=262144, num_heads=4, num_kv_heads=1, head_dim=256,
               max_position=32768, norm_eps=1e-6, rope_theta=1_000_000.0,
               rope_local_theta=10000.0, sliding_window=512, query_pre_attn_scalar=256,
               hidden_act="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0)

SPEC = FamilySpec(
    name="gemma3", hf_model_types=("gemma3_text", "gemma3"), hf_architecture="Gemma3ForCausalLM",
    math="mobiletune.models.gemma3", layer_prefix=llama.LAYER_PREFIX, layer_shapes=layer_shapes,
    embed=llama.EMBED, final_norm=llama.FINAL_NORM, hidden_act="gelu_pytorch_tanh",
    from_hf=from_hf, to_hf=to_hf, embed_scale=lambda cfg: cfg.hidden_size ** 0.5,
    attention_kind=attention_kind, linear_rope_scaling=True,
    peft_default_targets=("q_proj", "v_proj"), no_decay_markers=("norm", "bias", "embed_tokens"),
    presets={
        "gemma3-270m": Preset(dict(_GEMMA3, hidden_size=640, num_layers=18,
                                   intermediate_size=2048, layer_types=layer_types(18)), "gemma3"),
        "gemma3-1b": Preset(dict(_GEMMA3, hidden_size=1152, num_layers=26,
                                 intermediate_size=6912, layer_types=layer_types(26)), "gemma3"),
    },
    gguf=GGUFSpec(
        arch="gemma3", eps_key="attention.layer_norm_rms_epsilon", rope_base=1_000_000.0,
        blocks={**llama.GGUF_BLOCKS, "ffn_norm": "pre_feedforward_layernorm",
                "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
        norm_shift=1.0, config=gguf_config),
)
