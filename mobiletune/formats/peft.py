"""LoRA adapters in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``
with tensors named ``base_model.model.<module>.lora_{A,B}.weight``. Files written here
load with ``peft.PeftModel.from_pretrained``; adapters saved by PEFT load here.

PEFT features we do not implement (DoRA, rank/alpha patterns, lora biases, modules_to_save,
layer replication, ...) are refused on load with the key that asks for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mobiletune.errors import CheckpointError
from mobiletune.io import safetensors as st
from mobiletune.models.config import ModelConfig
from mobiletune.models.lora import LoraConfig, targets
from mobiletune.runtime.peft_io import CONFIG, PREFIX, WEIGHTS, write_adapter

# PEFT keys that change the math; we refuse any non-default value rather than ignore it.
_UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none",
                "lora_bias": False, "modules_to_save": None, "layer_replication": None,
                "target_parameters": None, "layers_pattern": None, "use_qalora": False,
                "trainable_token_indices": None}


def save_adapter(path, adapter: dict, cfg: ModelConfig, lcfg: LoraConfig,
                 base_model: str | None = None, extra_meta: dict | None = None) -> Path:
    return write_adapter(path, adapter, lcfg.resolved(cfg).to_dict(), cfg.family, base_model,
                         extra_meta)


def load_adapter(path, cfg: ModelConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapter params with our names) from a PEFT adapter directory,
    checked against the model: every targeted module present with the right shapes."""
    d = Path(path)
    cpath = d / CONFIG
    if not cpath.exists():
        raise CheckpointError(f"{d}: no {CONFIG} (not a PEFT adapter directory)")
    try:
        conf = json.loads(cpath.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{cpath}: not valid JSON ({e})") from None
    if conf.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cpath}: peft_type {conf.get('peft_type')!r} is not LORA")
    for k, default in _UNSUPPORTED.items():
        v = conf.get(k, default)
        if v is not None and v != default and v not in ([], {}):
            raise CheckpointError(f"{cpath}: {k}={conf[k]!r} is not supported")
    try:
        tm = conf["target_modules"]
        lcfg = LoraConfig(r=int(conf["r"]), alpha=float(conf["lora_alpha"]),
                          dropout=float(conf.get("lora_dropout", 0.0)),
                          target_modules=tm if isinstance(tm, str) else tuple(tm),
                          use_rslora=bool(conf.get("use_rslora", False)),
                          layers_to_transform=_layers(conf.get("layers_to_transform")))
    except KeyError as e:
        raise CheckpointError(f"{cpath}: missing key {e.args[0]!r}") from None
    wpath = d / WEIGHTS
    if not wpath.exists():
        raise CheckpointError(f"{d}: no {WEIGHTS}")
    try:
        raw = st.load(wpath, mmap=False)
    except st.SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    adapter = {}
    for k, v in raw.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        name = name.replace(".lora_A.default.weight", ".lora_A.weight").replace(
            ".lora_B.default.weight", ".lora_B.weight")
        adapter[name] = np.asarray(v, np.float32)
    expected = {}
    for mod, (fan_in, fan_out) in targets(cfg, lcfg).items():
        expected[mod + ".lora_A.weight"] = (lcfg.r, fan_in)
        expected[mod + ".lora_B.weight"] = (fan_out, lcfg.r)
    for k in sorted(set(expected) | set(adapter)):
        if k not in adapter:
            raise CheckpointError(f"{wpath}: missing tensor {PREFIX + k!r}")
        if k not in expected:
            raise CheckpointError(f"{wpath}: tensor {PREFIX + k!r} does not belong to this "
                                  f"{cfg.family} model's targets")
        if adapter[k].shape != expected[k]:
            raise CheckpointError(f"{wpath}: tensor {PREFIX + k!r} has shape "
                                  f"{adapter[k].shape}, expected {expected[k]}")
    return lcfg, adapter


def _layers(x):
    if x is None:
        return None
    return (x,) if isinstance(x, int) else tuple(x)
