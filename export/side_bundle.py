"""Recipe with a ``side=`` section -> a side-tuning bundle: the backbone's per-block forward
(weights streamed from a store, as a sharded bundle) plus the side network's signatures for
generation (``mobiletune.programs.side``). The phone trains nothing itself.

    python -m export RECIPE.py --side --out BUNDLE [--store-dtype float16]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from export.common import (
    EXPORT_MATMUL,
    ExportError,
    check_variants,
    manifest_fields,
    tokenizer_files,
    verify_in_fresh_process,
    write_report,
)
from export.sharded_bundle import FLOAT_STORES
from mobiletune.formats.loading import load_model
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.programs.side import SideProgram
from mobiletune.runtime import bundle as B
from mobiletune.runtime.metrics import peak_rss_mb
from mobiletune.train.recipe import Recipe


def export_side(recipe: Recipe, out, variants, store_dtype: str = "float32",
                verify: bool = True, vocab_chunk: int = 4096) -> dict:
    """Write a side-tuning bundle; returns the report."""
    if recipe.side is None:
        raise ExportError(f"--side: the recipe {recipe.name!r} has no side=SideConfig(...) "
                          f"section")
    if store_dtype not in FLOAT_STORES:
        raise ExportError(f"--store-dtype {store_dtype!r}: expected "
                          f"{' or '.join(FLOAT_STORES)} for a side bundle")
    t0 = time.perf_counter()
    out = Path(out)
    variants = check_variants(recipe, variants)
    m = load_model(recipe.model, seed=recipe.seed)
    tok, cfg, params = m.tokenizer, m.cfg, m.params
    m.params = None
    prog = SideProgram(cfg.replace(matmul=EXPORT_MATMUL), recipe.side,
                       {k: tuple(v.shape) for k, v in params.items()}, recipe.seq_len,
                       vocab_chunk=vocab_chunk)
    tmp = atomic.staging_dir(out)
    st.save(tmp / B.WEIGHTS, params, dtype=FLOAT_STORES[store_dtype])
    n_all = sum(int(np.prod(v.shape)) for v in params.values())
    del params
    st.save(tmp / B.STATE, {})  # the phone holds no trainable state
    files = {"weights": B.file_entry(tmp, B.WEIGHTS), "state": B.file_entry(tmp, B.STATE)}
    files.update(tokenizer_files(tok, tmp))
    from export.tflite import build_pure_module, convert
    table = prog.signatures(variants)
    module, sigs = build_pure_module(table)
    flat, convert_s = convert(module, sigs)
    (tmp / B.PROGRAM).write_bytes(flat)
    files["program"] = B.file_entry(tmp, B.PROGRAM)
    lay, side = prog.layout(store_dtype)
    manifest = B.Manifest(**manifest_fields(recipe, prog.cfg, None, tok, variants),
                          state=lay.state_specs({}), frozen=(),
                          signatures=tuple(prog.signature_meta(variants)), files=files,
                          sharded=lay, side=side)
    atomic.write_text(tmp / B.MANIFEST, manifest.to_json())
    atomic.replace_dir(tmp, out)
    if verify:
        verify_in_fresh_process(out)
    return write_report(out, {
        "bundle": str(out), "sharded": True, "side": True, "store_dtype": store_dtype,
        "program_bytes": len(flat), "params": n_all, "trainable_params": 0,
        "side_params": int(sum(np.prod(s) for s in side.shapes.values())),
        "convert_seconds": convert_s, "export_seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(), "variants": list(variants), "signatures": len(table)})
