"""GPT-2: learned absolute positions, LayerNorm, Conv1D weights stored (in, out), a fused
c_attn, tied head. Math: ``mobiletune/models/gpt2.py``."""

from __future__ import annotations

from mobiletune.families.config import ModelConfig
from mobiletune.families.spec import FamilySpec, GGUFSpec, Preset


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {"ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,),
            "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,)}


def from_hf(hf: dict) -> ModelConfig:
    d = hf["n_embd"]
    return ModelConfig(
        family="gpt2", vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * d, max_position=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), attention_bias=True, mlp_bias=True,
        hidden_act=hf.get("activation_function", SPEC.hidden_act),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def to_hf(c: ModelConfig) -> dict:
    return {"vocab_size": c.vocab_size, "n_embd": c.hidden_size, "n_layer": c.num_layers,
            "n_head": c.num_heads, "n_inner": c.intermediate_size,
            "n_positions": c.max_position, "n_ctx": c.max_position,
            "layer_norm_epsilon": c.norm_eps, "activation_function": c.hidden_act,
            "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0}


_COMMON = dict(vocab_size=50257, max_position=1024, norm_eps=1e-5, attention_bias=True,
              mlp_bias=True, hidden_act="gelu_new", bos_token_id=50256, eos_token_id=50256)

SPEC = FamilySpec(
    name="gpt2", hf_model_types=("gpt2",), hf_architecture="GPT2LMHeadModel",
    math="mobiletune.models.gpt2", layer_prefix="transformer.h.{i}.", layer_shapes=layer_shapes,
    embed="transformer.wte.weight", positions="transformer.wpe.weight",
    final_norm=("transformer.ln_f.weight", "transformer.ln_f.bias"),
    conv1d_modules=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    hidden_act="gelu_new", from_hf=from_hf, to_hf=to_hf,
    peft_default_targets=("c_attn",), no_decay_markers=("ln_", "bias", "wte", "wpe"),
    presets={
        "gpt2": Preset(dict(_COMMON, hidden_size=768, num_layers=12, num_heads=12,
                            num_kv_heads=12, head_dim=64, intermediate_size=3072), "gpt2"),
        "gpt2-medium": Preset(dict(_COMMON, hidden_size=1024, num_layers=24, num_heads=16,
                                   num_kv_heads=16, head_dim=64, intermediate_size=4096), "gpt2"),
    },
    gguf=GGUFSpec(
        arch="gpt2", eps_key="attention.layer_norm_epsilon", head_may_copy_embed=True,
        blocks={"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
        config=lambda meta, kw: dict(attention_bias=True, mlp_bias=True)),
)
