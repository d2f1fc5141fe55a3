"""Model families: one ``FamilySpec`` per family (``mobiletune/families/<family>.py``), found
by discovery, and the one ``ModelConfig`` they describe.

Everything family-specific that is not math derives from a spec: parameter names and shapes,
the Hugging Face and GGUF mappings, LoRA and weight-decay conventions, presets. The math is
in the module the spec names (``mobiletune/models/<family>.py``). Adding a family is a spec
file here plus a math file there (and its parity test).

Standard library only (no JAX, no numpy): the phone side and the GGUF reader import it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from mobiletune.families.config import ConfigError, ModelConfig
from mobiletune.families.spec import FamilySpec, GGUFSpec, Preset

__all__ = ["ConfigError", "FamilySpec", "GGUFSpec", "ModelConfig", "Preset", "FAMILIES",
           "GGUF_ARCHS", "PRESETS", "SPECS", "by_hf_model_type", "preset", "spec"]


def _discover() -> dict[str, FamilySpec]:
    """The ``SPEC`` of every module of this package, by family name."""
    found: dict[str, FamilySpec] = {}
    for m in pkgutil.iter_modules(__path__):
        s = getattr(importlib.import_module(f"{__name__}.{m.name}"), "SPEC", None)
        if isinstance(s, FamilySpec):
            if s.name in found:
                raise RuntimeError(f"two specs for family {s.name!r}")
            found[s.name] = s
    return found


SPECS: dict[str, FamilySpec] = _discover()
FAMILIES: tuple[str, ...] = tuple(SPECS)
_BY_HF_MODEL_TYPE = {mt: s for s in SPECS.values() for mt in s.hf_model_types}
GGUF_ARCHS: dict[str, FamilySpec] = {s.gguf.arch: s for s in SPECS.values() if s.gguf}
PRESETS: dict[str, Preset] = {  # preset name -> Preset whose config includes the family
    n: dataclasses.replace(p, config={"family": s.name, **p.config})
    for s in SPECS.values() for n, p in s.presets.items()}


def spec(family: str) -> FamilySpec:
    """The spec of ``family`` (a ``ModelConfig.family``)."""
    s = SPECS.get(family) if isinstance(family, str) else None
    if s is None:
        raise ConfigError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    return s


def by_hf_model_type(model_type: str) -> FamilySpec:
    """The spec of the family a config.json ``model_type`` belongs to."""
    s = _BY_HF_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if s is None:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: "
                          f"{sorted(_BY_HF_MODEL_TYPE)}")
    return s


def preset(name: str, **override) -> ModelConfig:
    """A named preset config, e.g. ``preset("gemma3-270m", num_layers=2)``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name].config, **override})
