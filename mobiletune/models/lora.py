"""LoRA as a tree transform, with PEFT's semantics.

For a targeted module ``m`` (a Linear, or GPT-2's Conv1D) the adapter adds two tensors to
the flat param dict, named as PEFT names them (minus PEFT's ``base_model.model.`` prefix):
``m.lora_A.weight`` (r, in) and ``m.lora_B.weight`` (out, r), and the layer computes
``base(x) + scale * B(A(dropout(x)))`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA). A starts Kaiming-uniform (PEFT: ``kaiming_uniform_(a=sqrt(5))``, i.e.
U(±1/sqrt(in))), B starts at zero, so a fresh adapter leaves the model unchanged.

Targeting follows PEFT's ``check_target_module_exists``: a string is a ``re.fullmatch``
regex over the module name; a list matches a name exactly or as a ``.suffix``;
``"all-linear"`` means every linear layer but the output head; ``layers_to_transform``
restricts list targets to those layer indices. Training differentiates only the adapter
(the trainable/frozen partition: ``train.setup.split_params``); ``merge`` folds the adapter
into the base weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune import families, models
from mobiletune.errors import MobiletuneError
from mobiletune.models.config import ModelConfig
from mobiletune.models.layers import LoraCtx

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for our families (from the specs).
DEFAULT_TARGETS = {name: s.peft_default_targets for name, s in families.SPECS.items()}
_LAYER_RE = re.compile(r".*?\.[^.]*\.(\d+)\.")  # PEFT's default layer-index pattern
SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None   # None: PEFT's default per family
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    last_n_layers: int | None = None                      # convenience for the last N layers

    def __post_init__(self):
        if self.r <= 0:
            raise MobiletuneError(f"lora.r={self.r}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise MobiletuneError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.layers_to_transform, list):
            object.__setattr__(self, "layers_to_transform", tuple(self.layers_to_transform))
        tm = self.target_modules
        if (isinstance(tm, str) and tm.lower() != "all-linear"
                and (self.layers_to_transform is not None or self.last_n_layers is not None)):
            raise MobiletuneError("lora: a regex target_modules cannot be combined with "
                                  "layers_to_transform / last_n_layers (as in PEFT)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def ctx(self, key=None, train: bool = False) -> LoraCtx:
        return LoraCtx(self.scale, self.dropout if train else 0.0, key if train else None)

    def resolved(self, cfg: ModelConfig) -> "LoraConfig":
        """Defaults filled in for a model: target modules and the layer list."""
        tm = self.target_modules
        if tm is None:
            tm = families.spec(cfg.family).peft_default_targets
        if isinstance(tm, str) and tm.lower() == "all-linear":
            # PEFT expands "all-linear" to full module names, which then ignore
            # layers_to_transform; we expand to the module suffixes so that both the
            # layer restriction and the saved adapter_config.json mean the same set.
            tm = tuple(sorted({m.rsplit(".", 1)[-1] for m in linear_modules(cfg)}))
        layers = self.layers_to_transform
        if self.last_n_layers is not None:
            layers = tuple(range(max(0, cfg.num_layers - self.last_n_layers), cfg.num_layers))
        return dataclasses.replace(self, target_modules=tm, layers_to_transform=layers,
                                   last_n_layers=None)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("target_modules", "layers_to_transform"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def linear_modules(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every linear module name (PEFT's naming) -> (in_features, out_features), excluding
    the output head and the embeddings, as PEFT's "all-linear" does. A Linear weight is
    (out, in); a Conv1D weight (GPT-2) is (in, out)."""
    spec = families.spec(cfg.family)
    skip = (spec.embed, spec.positions, spec.head)
    out = {}
    for name, shape in models.param_shapes(cfg).items():
        if not name.endswith(".weight") or len(shape) != 2 or name in skip:
            continue
        mod = name[: -len(".weight")]
        out[mod] = (shape[0], shape[1]) if spec.is_conv1d(mod) else (shape[1], shape[0])
    return out


def matches(lcfg: LoraConfig, module: str) -> bool:
    """PEFT's rule for whether ``module`` gets an adapter (lcfg must be resolved)."""
    tm = lcfg.target_modules
    if isinstance(tm, str):              # a regex: layers_to_transform does not apply (PEFT)
        return re.fullmatch(tm, module) is not None
    if module in tm:                     # an exact name: layers_to_transform does not apply
        return True
    found = any(module.endswith("." + t) for t in tm)
    if found and lcfg.layers_to_transform:
        m = _LAYER_RE.match(module)
        found = m is not None and int(m.group(1)) in lcfg.layers_to_transform
    return found


def targets(cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, tuple[int, int]]:
    lcfg = lcfg.resolved(cfg)
    found = {m: io for m, io in linear_modules(cfg).items() if matches(lcfg, m)}
    if not found:
        raise MobiletuneError(f"lora.target_modules={lcfg.target_modules!r} matches no linear "
                              f"module of this {cfg.family} model")
    return found


def init_lora(cfg: ModelConfig, lcfg: LoraConfig, key) -> dict:
    """Fresh adapter params: A ~ U(±1/sqrt(in)), B = 0."""
    tg = targets(cfg, lcfg)
    keys = jax.random.split(key, len(tg))
    out = {}
    for (mod, (fan_in, fan_out)), k in zip(sorted(tg.items()), keys):
        bound = 1.0 / math.sqrt(fan_in)
        out[mod + ".lora_A.weight"] = jax.random.uniform(k, (lcfg.r, fan_in), jnp.float32,
                                                         -bound, bound)
        out[mod + ".lora_B.weight"] = jnp.zeros((fan_out, lcfg.r), jnp.float32)
    return out


def is_lora_key(name: str) -> bool:
    return name.endswith(SUFFIXES)


def merge(base: dict, adapter: dict, cfg: ModelConfig, lcfg: LoraConfig) -> dict:
    """Base weights with every adapter folded in: W + scale * B @ A ((B @ A).T for Conv1D)."""
    spec = families.spec(cfg.family)
    out = dict(base)
    xp = jnp if any(isinstance(v, jax.Array) for v in adapter.values()) else np
    for a_name in [k for k in adapter if k.endswith(".lora_A.weight")]:
        mod = a_name[: -len(".lora_A.weight")]
        delta = lcfg.scale * (xp.asarray(adapter[mod + ".lora_B.weight"]) @ xp.asarray(adapter[a_name]))
        w = out[mod + ".weight"]
        out[mod + ".weight"] = w + (delta.T if spec.is_conv1d(mod) else delta)
    return out
