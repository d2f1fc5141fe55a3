"""Model configuration: one frozen dataclass for every family.

A config is plain data. It is embedded in every checkpoint and bundle we write, and it
is built tolerantly from a Hugging Face ``config.json`` (unknown keys are ignored, as
mlx-lm's ``ModelArgs.from_dict`` does) or from GGUF metadata. What each family reads and
writes is in its spec (``mobiletune/families/<family>.py``); the presets are there too
(``mobiletune.families.preset``).

It lives here, beside the specs and standard library only, so that the GGUF reader and the
phone side can build and read configs without importing JAX (``mobiletune.models`` does).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from mobiletune.errors import MobiletuneError


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
    matmul: str = "einsum"                # how products are written: "einsum" | "batch_matmul"
    #                                       (for LiteRT export; models.layers.MATMUL_FORMS)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        from mobiletune import families
        families.spec(self.family)  # a ConfigError naming the known families
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.matmul not in ("einsum", "batch_matmul"):
            raise ConfigError(f"matmul={self.matmul!r}: expected 'einsum' or 'batch_matmul'")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_layers} layers")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def num_params(self) -> int:
        from mobiletune import families
        return sum(_prod(s) for s in families.spec(self.family).param_shapes(self).values())

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
        from mobiletune import families
        spec = families.spec(self.family)
        return {"model_type": spec.hf_model_types[0], "architectures": [spec.hf_architecture],
                **spec.to_hf(self)}

    @classmethod
    def from_hf_config(cls, hf: dict | str | Path) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` (dict or path). Unknown keys are ignored."""
        from mobiletune import families
        if not isinstance(hf, dict):
            path = Path(hf)
            try:
                hf = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path}: cannot read config: {e}") from None
        mt = hf.get("model_type")
        spec = families.by_hf_model_type(mt)
        try:
            return spec.from_hf(hf)
        except KeyError as e:
            raise ConfigError(f"config for model_type {mt!r} lacks key {e.args[0]!r}") from None


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --- helpers for the families' from_hf ----------------------------------------------------
def hf_rope_theta(hf: dict, layer_type: str | None = None, default: float = 10000.0) -> float:
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


def hf_rope_factor(hf: dict, layer_type: str | None = None) -> float:
    """The linear RoPE scaling factor (1.0 for none); other scaling types are refused."""
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


def first(x):
    """A token id that config.json may give as a list (the first one)."""
    return x[0] if isinstance(x, list) and x else x
