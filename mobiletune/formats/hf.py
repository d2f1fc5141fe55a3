"""Hugging Face checkpoint directories: ``config.json`` + ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``). Loading asserts the key set and every shape
against the config; saving writes a directory ``transformers.from_pretrained`` loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mobiletune import families
from mobiletune.errors import CheckpointError
from mobiletune.families.config import ConfigError, ModelConfig
from mobiletune.io import atomic
from mobiletune.io import safetensors as st

# Keys transformers may write that are not parameters (buffers) — safe to ignore.
_IGNORABLE_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def check_params(params: dict, cfg: ModelConfig, source: str) -> dict:
    """Keep exactly the parameters ``cfg`` implies, as float32; raise naming any key that is
    missing, unexpected or of the wrong shape. A tied ``lm_head.weight`` is dropped."""
    expected = families.spec(cfg.family).param_shapes(cfg)
    params = dict(params)
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)
    for k in [k for k in params if k.endswith(_IGNORABLE_SUFFIXES) and k not in expected]:
        params.pop(k)
    missing = sorted(set(expected) - set(params))
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(params) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r} for a {cfg.family} model"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    out = {}
    for k, shape in expected.items():
        a = params[k]
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {tuple(a.shape)}, "
                                  f"config implies {tuple(shape)}")
        out[k] = np.asarray(a, dtype=np.float32)
    return out


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        return [d / f for f in sorted(set(wm.values()))]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")


def load_hf_dir(path: str | Path) -> tuple[ModelConfig, dict]:
    """(config, params) from an HF directory; params are float32 numpy arrays."""
    d = Path(path)
    if not (d / "config.json").exists():
        raise CheckpointError(f"{d}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = ModelConfig.from_hf_config(d / "config.json")
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'}: {e}") from None
    raw = {}
    for f in _weight_files(d):
        try:
            tensors = st.load(f)
        except st.SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        for k, v in tensors.items():
            if k in raw:
                raise CheckpointError(f"{f}: key {k!r} appears in two shards")
            raw[k] = v
    return cfg, check_params(raw, cfg, str(d))


def save_hf_dir(path: str | Path, cfg: ModelConfig, params: dict, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) in HF's layout."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    params = check_params({k: np.asarray(v) for k, v in params.items()}, cfg, str(d))
    st.save(d / "model.safetensors", params, meta={"format": "pt"})
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "float32"
    atomic.write_text(d / "config.json", json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(d)
    return d
