"""Recipe -> sharded training bundle: a program whose signatures do not grow with depth
(``mobiletune.programs.sharded``) plus a weight store the phone streams from.

    python -m export RECIPE.py --out BUNDLE --sharded [--store-dtype float16]

The weights are written first and dropped before tracing, so the exporter's peak memory
is about one copy of the model (plus the converter's, which only sees one block).
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from export import constant_decode
from export.common import (
    EXPORT_MATMUL,
    ExportError,
    check_variants,
    manifest_fields,
    tokenizer_files,
    verify_in_fresh_process,
    write_report,
)
from mobiletune.formats.loading import load_model
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.programs.sharded import ShardedModel, signature_meta
from mobiletune.runtime import bundle as B
from mobiletune.runtime.metrics import peak_rss_mb
from mobiletune.runtime.sharded import int8
from mobiletune.train.recipe import Recipe
from mobiletune.train.setup import split_params

FLOAT_STORES = {"float32": np.float32, "float16": np.float16}
STORE_DTYPES = (*FLOAT_STORES, "int8")  # int8: per-output-channel scales (runtime/sharded/int8.py)


def write_files(recipe: Recipe, tmp: Path, store_dtype: str,
                vocab_chunk: int = 4096) -> tuple[ShardedModel, dict, object]:
    """Load the model, write the weight store and the initial state into ``tmp``; returns
    (the sharded model, the file entries, the tokenizer). No TensorFlow involved, and no
    second (JAX) copy of the model."""
    if store_dtype not in STORE_DTYPES:
        raise ExportError(f"--store-dtype {store_dtype!r}: expected {' or '.join(STORE_DTYPES)}")
    m = load_model(recipe.model, seed=recipe.seed)
    tok, cfg, params = m.tokenizer, m.cfg, m.params
    m.params = None
    trainable, frozen = split_params(recipe, cfg, params)
    del params
    sm = ShardedModel(cfg.replace(matmul=EXPORT_MATMUL),
                      recipe.lora.resolved(cfg) if recipe.lora else None,
                      recipe.optim_config(), {k: tuple(v.shape) for k, v in trainable.items()},
                      {k: tuple(v.shape) for k, v in frozen.items()}, recipe.seq_len,
                      vocab_chunk=vocab_chunk)
    if store_dtype == "int8":
        st.save(tmp / B.WEIGHTS, int8.quantize_store(frozen, cfg.family))
    else:
        st.save(tmp / B.WEIGHTS, frozen, dtype=FLOAT_STORES[store_dtype])
    del frozen
    init = {B.trainable_name(k): np.asarray(v) for k, v in trainable.items() if np.any(v)}
    st.save(tmp / B.STATE, init)  # zeros (optimizer moments, accumulators, LoRA B) implied
    del trainable, init, m
    gc.collect()
    files = {"weights": B.file_entry(tmp, B.WEIGHTS), "state": B.file_entry(tmp, B.STATE)}
    files.update(tokenizer_files(tok, tmp))
    return sm, files, tok


def export_sharded(recipe: Recipe, out, variants, store_dtype: str = "float32",
                   verify: bool = True, program: bool = True, vocab_chunk: int = 4096) -> dict:
    """Write a sharded bundle; ``program=False`` skips the LiteRT program (tests run the
    chain with ``mobiletune.programs.sharded.JaxCalls`` instead). Returns the report."""
    t0 = time.perf_counter()
    out = Path(out)
    variants = check_variants(recipe, variants)
    tmp = atomic.staging_dir(out)
    sm, files, tok = write_files(recipe, tmp, store_dtype, vocab_chunk)
    convert_s, program_bytes = 0.0, 0
    consts = {}
    if program:
        from export.tflite import build_pure_module, convert
        table = sm.signatures(variants)
        module, sigs = build_pure_module(table)
        flat, convert_s = convert(module, sigs)
        (tmp / B.PROGRAM).write_bytes(flat)
        files["program"] = B.file_entry(tmp, B.PROGRAM)
        program_bytes = len(flat)
        t1 = time.perf_counter()
        consts, n = constant_decode.write_skeletons(table, sm.kinds, tmp, files)
        program_bytes += n
        convert_s += time.perf_counter() - t1
    sigs = signature_meta(sm, variants)
    manifest = B.Manifest(**manifest_fields(recipe, sm.cfg, sm.lcfg, tok, variants),
                          state=sm.state_specs(store_dtype), frozen=(), signatures=tuple(sigs),
                          files=files, sharded=replace(sm.layout(store_dtype),
                                                       decode_consts=consts))
    atomic.write_text(tmp / B.MANIFEST, manifest.to_json())
    atomic.replace_dir(tmp, out)
    if verify and program:
        verify_in_fresh_process(out)
    n_all = sum(int(np.prod(s)) for s in sm.shapes.values())
    n_tr = sum(int(np.prod(sm.shapes[t])) for t in sm.trainable)
    rep = write_report(out, {
        "bundle": str(out), "sharded": True, "weights_bytes": 4 * n_all,
        "program_bytes": program_bytes, "params": n_all, "trainable_params": n_tr,
        "store_dtype": store_dtype, "convert_seconds": convert_s,
        "export_seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
        "variants": list(variants), "signatures": len(sigs)})
    rep["ratio"] = rep["bundle_bytes"] / rep["weights_bytes"]
    return rep
