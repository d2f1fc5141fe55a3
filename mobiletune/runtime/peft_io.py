"""Writing LoRA adapters in PEFT's layout with numpy alone, so the phone's result loads on a
desktop (``mobiletune ppl --adapter``, ``peft.PeftModel.from_pretrained``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mobiletune import families
from mobiletune.io import atomic
from mobiletune.io import safetensors as st

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def adapter_config(lora: dict, family: str, base_model: str | None) -> dict:
    """PEFT's adapter_config.json for a *resolved* LoraConfig dict. ``fan_in_fan_out``: the
    family's linear layers are Conv1D, weights stored (in, out) (GPT-2)."""
    tm = lora["target_modules"]
    conv1d = bool(families.spec(family).conv1d_modules)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["r"],
            "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
            "target_modules": tm if isinstance(tm, str) else sorted(tm),
            "use_rslora": lora["use_rslora"], "fan_in_fan_out": conv1d,
            "bias": "none", "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": list(lora["layers_to_transform"])
            if lora.get("layers_to_transform") else None,
            "base_model_name_or_path": base_model, "revision": None}


def write_adapter(path, adapter: dict, lora: dict, family: str, base_model: str | None = None,
                  meta: dict | None = None) -> Path:
    """adapter: {module.lora_A.weight: array, ...} with our (PEFT-minus-prefix) names."""
    d = Path(path)
    tensors = {PREFIX + k: np.asarray(v, np.float32) for k, v in adapter.items()}
    st.save(d / WEIGHTS, tensors, meta={"format": "pt", **(meta or {})})
    atomic.write_text(d / CONFIG, json.dumps(adapter_config(lora, family, base_model),
                                                indent=2) + "\n")
    return d
