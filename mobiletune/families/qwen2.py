"""Qwen 2.5: the llama layout plus q/k/v biases (no o_proj bias), head tied by default; in
GGUF, Q/K rows are not permuted. Math: ``mobiletune/models/llama.py``."""

from __future__ import annotations

import dataclasses
import functools

from mobiletune.families import llama
from mobiletune.families.config import ModelConfig
from mobiletune.families.spec import Preset


def to_hf(c: ModelConfig) -> dict:
    return {**llama.decoder_to_hf(c), "use_sliding_window": False,
            "layer_types": ["full_attention"] * c.num_layers}


SPEC = dataclasses.replace(
    llama.SPEC, name="qwen2", hf_model_types=("qwen2",), hf_architecture="Qwen2ForCausalLM",
    layer_shapes=functools.partial(llama.layer_shapes, o_proj_bias=False),
    from_hf=functools.partial(llama.from_hf, family="qwen2", tie_default=True, qkv_bias=True),
    to_hf=to_hf,
    presets={
        "qwen2.5-0.5b": Preset(dict(vocab_size=151936, hidden_size=896, num_layers=24,
                                    num_heads=14, num_kv_heads=2, head_dim=64,
                                    intermediate_size=4864, max_position=32768, norm_eps=1e-6,
                                    tie_embeddings=True, attention_bias=True,
                                    rope_theta=1_000_000.0, bos_token_id=151643,
                                    eos_token_id=151643), "qwen2.5"),
    },
    gguf=dataclasses.replace(llama.SPEC.gguf, arch="qwen2", head_dim_keys=("attention.key_length",),
                             permuted={}, config=lambda meta, kw: dict(attention_bias=True)),
)
