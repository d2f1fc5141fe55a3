"""Recipe -> training bundle directory (monolithic: one program holds the whole model).

    python -m export RECIPE.py --out BUNDLE [--set key=value ...] [--variants 1,2,4]

Writes the bundle into a temporary sibling directory and renames it into place, then
verifies it in a fresh process that imports no JAX or TensorFlow.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import mobiletune
from export.tflite import ExportError, build_module, convert
from mobiletune.formats.loading import load_model, peek_config
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.programs.monolithic import Program
from mobiletune.runtime.bundle import (
    BASE,
    MANIFEST,
    PROGRAM,
    STATE,
    Manifest,
    file_entry,
)
from mobiletune.runtime.metrics import peak_rss_mb
from mobiletune.train.recipe import Recipe
from mobiletune.train.trainer import build_steps

# The monolithic converter's memory grows with the traced program: a 29.5M-param full
# fine-tune peaked at 8.6 GB here (shared notes); SmolLM2-135M LoRA (frozen weights as
# variables) peaked at 5.4 GB in 3.4 min. Beyond these a sharded export is needed (issue 6).
MAX_TRAINABLE_PARAMS = 20_000_000
MAX_TOTAL_PARAMS = 150_000_000


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_size(recipe: Recipe, n_all: int, n_tr: int | None) -> None:
    if (n_tr or 0) > MAX_TRAINABLE_PARAMS or n_all > MAX_TOTAL_PARAMS:
        raise ExportError(f"{recipe.model}: {n_all:,} params"
                          + (f" ({n_tr:,} trainable)" if n_tr is not None else "")
                          + f" is too large for a monolithic bundle on this machine (limits "
                          f"{MAX_TOTAL_PARAMS:,} / {MAX_TRAINABLE_PARAMS:,} trainable): export it with "
                          f"--sharded (per-block signatures, weights streamed from disk)")


def check_variants(recipe: Recipe, variants) -> tuple[int, ...]:
    variants = tuple(sorted(set(int(v) for v in variants)))
    if not variants or min(variants) < 1:
        raise ExportError(f"--variants {variants}: need positive micro-batch sizes")
    bad = [v for v in variants if recipe.batch_size % v]
    if bad:
        raise ExportError(f"--variants {bad}: each micro-batch size must divide the effective "
                          f"batch {recipe.batch_size} (micro_batch × accumulation), so any "
                          f"variant can make up a whole optimizer step")
    return variants


def export_bundle(recipe: Recipe, out, variants=(1, 2, 4), verify: bool = True) -> dict:
    """Write the bundle; returns a report (bytes, needed bytes, seconds, peak memory)."""
    t0 = time.perf_counter()
    out = Path(out)
    variants = check_variants(recipe, variants)
    cfg = peek_config(recipe.model)
    if cfg is not None:  # refuse before loading weights where the config is at hand
        _check_size(recipe, cfg.num_params, None if recipe.lora else cfg.num_params)
    m = load_model(recipe.model, seed=recipe.seed)
    tok = m.tokenizer
    steps, trainable, frozen = build_steps(recipe, m)
    n_tr = sum(int(np.prod(v.shape)) for v in trainable.values())
    n_all = n_tr + sum(int(np.prod(v.shape)) for v in frozen.values())
    _check_size(recipe, n_all, n_tr)
    prog = Program(steps, trainable, frozen, recipe.seq_len)
    frozen_np = {f"frozen/{k}": np.asarray(v) for k, v in frozen.items()}
    module, sigs, sig_meta = build_module(prog, prog.frozen_specs(frozen), variants)
    flat, convert_s = convert(module, sigs)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PROGRAM).write_bytes(flat)
    state = {k: v for k, v in prog.initial_state().items() if np.any(v)}  # zeros are implied
    st.save(tmp / STATE, state)
    files = {"program": file_entry(tmp, PROGRAM), "state": file_entry(tmp, STATE)}
    if frozen_np:
        st.save(tmp / BASE, frozen_np)
        files["base_weights"] = file_entry(tmp, BASE)
    tok.save(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        files[name] = file_entry(tmp, name)
    manifest = Manifest(
        model=prog.cfg.to_dict(),
        lora=steps.lcfg.to_dict() if steps.lcfg else None,
        optim={**recipe.optim.to_dict(), "total_steps": recipe.steps},
        data=recipe.data_config().to_dict(), recipe=recipe.to_dict(), seq_len=recipe.seq_len,
        variants=variants, effective_batch=recipe.batch_size, state=prog.state_specs(),
        frozen=prog.frozen_specs(frozen), signatures=tuple(sig_meta), files=files,
        tokenizer={"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                   "adds_bos": tok.adds_bos},
        tools={"mobiletune": mobiletune.__version__, "jax": _version("jax"),
               "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"),
               "ai-edge-litert": _version("ai-edge-litert")},
        extra={"hf_config": prog.cfg.to_hf_dict(), "base_model": recipe.model})
    atomic.write_text(tmp / MANIFEST, manifest.to_json())
    atomic.replace_dir(tmp, out)
    if verify:
        verify_in_fresh_process(out)
    bundle_bytes = sum(p.stat().st_size for p in out.iterdir())
    # what the phone must have in any case: the weights, the non-zero initial state and
    # the tokenizer; the rest (the program, the manifest) is the bundle's overhead
    needed = 4 * (n_all + sum(int(np.prod(v.shape)) for k, v in state.items()
                              if not k.startswith("trainable/")))
    needed += sum(files[n]["bytes"] for n in ("tokenizer.json", "tokenizer_config.json"))
    return {"bundle": str(out), "bundle_bytes": bundle_bytes, "needed_bytes": needed,
            "ratio": bundle_bytes / needed, "program_bytes": len(flat), "params": n_all,
            "trainable_params": n_tr, "convert_seconds": convert_s,
            "export_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
            "variants": list(variants)}


def verify_in_fresh_process(bundle: Path) -> None:
    """Load the bundle where only the phone's packages are imported (no JAX, no TF)."""
    r = subprocess.run([sys.executable, "-m", "mobiletune.runtime.verify", str(bundle)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ExportError(f"{bundle}: verification in a fresh LiteRT process failed: "
                          f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")


def report_lines(rep: dict) -> list[str]:
    if rep.get("sharded"):
        first = (f"sharded bundle {rep['bundle']}: {rep['bundle_bytes']:,} bytes for "
                 f"{rep['weights_bytes']:,} bytes of float32 weights ({rep['ratio']:.2f}×, store "
                 f"{rep['store_dtype']}; program {rep['program_bytes']:,} bytes, "
                 f"{rep['signatures']} signatures)")
    else:
        first = (f"bundle {rep['bundle']}: {rep['bundle_bytes']:,} bytes for "
                 f"{rep['needed_bytes']:,} bytes of state ({rep['ratio']:.2f}×; program "
                 f"{rep['program_bytes']:,} bytes)")
    return [first,
            f"params {rep['params']:,} ({rep['trainable_params']:,} trainable); variants "
            f"{rep['variants']}; conversion {rep['convert_seconds']:.1f} s, export "
            f"{rep['export_seconds']:.1f} s; peak RSS {rep['peak_rss_mb']:.0f} MB",
            json.dumps(rep)]
