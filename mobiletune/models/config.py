"""Model configuration: one frozen dataclass for every family, with named presets.

A config is plain data. It is embedded in every checkpoint and bundle we write, and it
is built tolerantly from a Hugging Face ``config.json`` (unknown keys are ignored, as
mlx-lm's ``ModelArgs.from_dict`` does) or from GGUF metadata.

Families:
  ``gpt2``   learned positions, LayerNorm, Conv1D weights (in, out), tied head.
  ``llama``  RoPE, RMSNorm, SwiGLU, GQA (SmolLM2 uses this layout).
  ``qwen2``  the llama layout plus q/k/v biases (Qwen 2.5).
  ``gemma3`` the Gemma 3 text model: sqrt(d)-scaled embedding, (1+w) RMSNorm, q/k norm,
             sandwich norms, GeGLU (tanh GELU), interleaved sliding-window/global layers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobiletune.errors import MobiletuneError

FAMILIES = ("gpt2", "llama", "qwen2", "gemma3")
HF_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3",
                  "gemma3": "gemma3"}
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}


class ConfigError(MobiletuneError, ValueError):
    """A config that cannot describe a model we support."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position: int
    norm_eps: float
    tie_embeddings: bool = True
    attention_bias: bool = False          # q/k/v (and o for llama's attention_bias) biases
    mlp_bias: bool = False
    rope_theta: float = 10000.0           # global layers (gemma3) / all layers
    rope_scaling_factor: float = 1.0      # linear position scaling of the global RoPE
    rope_local_theta: float = 10000.0     # gemma3 sliding-window layers
    sliding_window: int | None = None     # gemma3 local layers attend to this many tokens
    layer_types: tuple[str, ...] = ()     # per layer: "full_attention" | "sliding_attention"
    query_pre_attn_scalar: float | None = None  # gemma3: scores scaled by this ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_layers} layers")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        from mobiletune.models import param_shapes
        return sum(_prod(s) for s in param_shapes(self).values())

    # --- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "layer_types" in kw:
            kw["layer_types"] = tuple(kw["layer_types"])
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """The ``config.json`` transformers needs to build this model."""
        return _to_hf[self.family](self)

    @classmethod
    def from_hf_config(cls, hf: dict | str | Path) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` (dict or path). Unknown keys are ignored."""
        if not isinstance(hf, dict):
            path = Path(hf)
            try:
                hf = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}: cannot read config: {e}") from None
        if "text_config" in hf and hf.get("model_type") == "gemma3":
            hf = {**hf["text_config"], "model_type": "gemma3_text"}
        mt = hf.get("model_type")
        if mt not in HF_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {mt!r}; supported: "
                              f"{sorted(HF_MODEL_TYPES)}")
        try:
            return _from_hf[HF_MODEL_TYPES[mt]](hf)
        except KeyError as e:
            raise ConfigError(f"config for model_type {mt!r} lacks key {e.args[0]!r}") from None


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _rope_theta(hf: dict, layer_type: str | None = None, default: float = 10000.0) -> float:
    """transformers 4.x keeps rope_theta at top level; 5.x nests it in rope_parameters."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict):
        if layer_type and isinstance(rp.get(layer_type), dict):
            rp = rp[layer_type]
        if "rope_theta" in rp:
            return float(rp["rope_theta"])
    if layer_type == "sliding_attention":
        return float(hf.get("rope_local_base_freq", default))
    return float(hf.get("rope_theta", default))


def _rope_factor(hf: dict, layer_type: str | None = None) -> float:
    rs = hf.get("rope_scaling")
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict):
        rs = rp.get(layer_type, rp) if layer_type else rp
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return 1.0
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "linear":
        raise ConfigError(f"rope scaling type {kind!r} is not supported (only 'linear')")
    return float(rs["factor"])


def _gpt2_from_hf(hf: dict) -> ModelConfig:
    d = hf["n_embd"]
    return ModelConfig(
        family="gpt2", vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * d, max_position=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True), attention_bias=True, mlp_bias=True,
        hidden_act=hf.get("activation_function", "gelu_new"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def _llama_from_hf(hf: dict, family: str = "llama") -> ModelConfig:
    nh = hf["num_attention_heads"]
    if hf.get("rope_scaling") and _rope_factor(hf) != 1.0:
        raise ConfigError("llama rope_scaling is not supported")
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=nh,
        num_kv_heads=hf.get("num_key_value_heads") or nh,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // nh,
        intermediate_size=hf["intermediate_size"],
        max_position=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", family == "qwen2"),
        attention_bias=True if family == "qwen2" else hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False), rope_theta=_rope_theta(hf),
        hidden_act=hf.get("hidden_act", "silu"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"))


def _gemma3_from_hf(hf: dict) -> ModelConfig:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if not types:
        pattern = hf.get("sliding_window_pattern", 6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n)]
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
        rope_theta=_rope_theta(hf, "full_attention", 1_000_000.0),
        rope_scaling_factor=_rope_factor(hf, "full_attention"),
        rope_local_theta=_rope_theta(hf, "sliding_attention", 10000.0),
        sliding_window=hf.get("sliding_window", 512), layer_types=tuple(types),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", hd),
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        bos_token_id=hf.get("bos_token_id", 2), eos_token_id=_first(hf.get("eos_token_id", 1)),
        pad_token_id=hf.get("pad_token_id", 0))


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def _gpt2_to_hf(c: ModelConfig) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": c.vocab_size, "n_embd": c.hidden_size, "n_layer": c.num_layers,
            "n_head": c.num_heads, "n_inner": c.intermediate_size,
            "n_positions": c.max_position, "n_ctx": c.max_position,
            "layer_norm_epsilon": c.norm_eps, "activation_function": c.hidden_act,
            "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_token_id,
            "eos_token_id": c.eos_token_id, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0}


def _llama_to_hf(c: ModelConfig) -> dict:
    d = {"model_type": c.family, "architectures": [HF_ARCHITECTURES[c.family]],
         "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
         "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
         "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
         "head_dim": c.head_dim, "max_position_embeddings": c.max_position,
         "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
         "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
         "tie_word_embeddings": c.tie_embeddings, "hidden_act": c.hidden_act,
         "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
         "pad_token_id": c.pad_token_id, "attention_dropout": 0.0}
    if c.family == "llama":
        d.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
    else:
        d.update(use_sliding_window=False, layer_types=["full_attention"] * c.num_layers)
    return d


def _gemma3_to_hf(c: ModelConfig) -> dict:
    full = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling_factor != 1.0:
        full = {"rope_type": "linear", "rope_theta": c.rope_theta,
                "factor": c.rope_scaling_factor}
    return {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
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


_from_hf = {"gpt2": _gpt2_from_hf, "llama": _llama_from_hf,
            "qwen2": lambda hf: _llama_from_hf(hf, "qwen2"), "gemma3": _gemma3_from_hf}
_to_hf = {"gpt2": _gpt2_to_hf, "llama": _llama_to_hf, "qwen2": _llama_to_hf,
          "gemma3": _gemma3_to_hf}


# --- presets ---------------------------------------------------------------------------
def _gemma_types(n: int, pattern: int = 6) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(n))


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(family="gpt2", vocab_size=50257, hidden_size=768, num_layers=12,
                 num_heads=12, num_kv_heads=12, head_dim=64, intermediate_size=3072,
                 max_position=1024, norm_eps=1e-5, attention_bias=True, mlp_bias=True,
                 hidden_act="gelu_new", bos_token_id=50256, eos_token_id=50256),
    "gpt2-medium": dict(family="gpt2", vocab_size=50257, hidden_size=1024, num_layers=24,
                        num_heads=16, num_kv_heads=16, head_dim=64, intermediate_size=4096,
                        max_position=1024, norm_eps=1e-5, attention_bias=True,
                        mlp_bias=True, hidden_act="gelu_new", bos_token_id=50256,
                        eos_token_id=50256),
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
                         max_position=32768, norm_eps=1e-6, tie_embeddings=True,
                         attention_bias=True, rope_theta=1_000_000.0,
                         bos_token_id=151643, eos_token_id=151643),
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                         max_position=8192, norm_eps=1e-5, tie_embeddings=True,
                         rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2),
    "gemma3-270m": dict(family="gemma3", vocab_size=262144, hidden_size=640, num_layers=18,
                        num_heads=4, num_kv_heads=1, head_dim=256, intermediate_size=2048,
                        max_position=32768, norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_theta=10000.0, sliding_window=512,
                        layer_types=_gemma_types(18), query_pre_attn_scalar=256,
                        hidden_act="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
                        pad_token_id=0),
    "gemma3-1b": dict(family="gemma3", vocab_size=262144, hidden_size=1152, num_layers=26,
                      num_heads=4, num_kv_heads=1, head_dim=256, intermediate_size=6912,
                      max_position=32768, norm_eps=1e-6, rope_theta=1_000_000.0,
                      rope_local_theta=10000.0, sliding_window=512,
                      layer_types=_gemma_types(26), query_pre_attn_scalar=256,
                      hidden_act="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1,
                      pad_token_id=0),
}


def preset(name: str, **override) -> ModelConfig:
    """A named preset config, e.g. ``preset("gemma3-270m", num_layers=2)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **override})
