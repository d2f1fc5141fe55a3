"""Recipe -> sharded training bundle: a program whose signatures do not grow with depth
(``mobiletune.programs.sharded``) plus a weight store the phone streams from.

    python -m export RECIPE.py --out BUNDLE --sharded [--store-dtype float16]

The weights are written first and dropped before tracing, so the exporter's peak memory
is about one copy of the model (plus the converter's, which only sees one block).
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from pathlib import Path

import jax
import numpy as np

import mobiletune
from mobiletune.errors import MobiletuneError
from mobiletune.formats.loading import load_model
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.models import lora
from mobiletune.programs.sharded import ShardedModel, signature_meta
from mobiletune.runtime.bundle import MANIFEST, PROGRAM, STATE, Manifest, TensorSpec, file_entry
from mobiletune.runtime.metrics import peak_rss_mb
from mobiletune.runtime.sharded import STORE
from mobiletune.train.recipe import Recipe

STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def state_specs(sm: ShardedModel) -> tuple[TensorSpec, ...]:
    out = []
    for t in sm.trainable:
        out += [TensorSpec(f"trainable/{t}", tuple(sm.shapes[t]), "float32"),
                TensorSpec(f"acc/{t}", tuple(sm.shapes[t]), "float32")]
    leaves = {w: sm.opt_leaves(w) for w in sm.opt_kinds()}
    for g in sm.groups:
        for n, shape, dtype in leaves[g["signature"][len("opt_"):]]:
            shape = (g["size"],) if shape == (sm.opt_chunk,) else shape
            out.append(TensorSpec(f"opt/{g['name']}/{n}", shape, dtype))
    out += [TensorSpec("acc_nll", (), "float32"), TensorSpec("acc_count", (), "float32")]
    return tuple(sorted(out, key=lambda s: s.name))


def write_files(recipe: Recipe, tmp: Path, store_dtype: str,
                vocab_chunk: int = 4096) -> tuple[ShardedModel, dict, object]:
    """Load the model, write the weight store and the initial state into ``tmp``; returns
    (the sharded model, the file entries, the tokenizer). No TensorFlow involved."""
    if store_dtype not in STORE_DTYPES:
        raise MobiletuneError(
            f"--store-dtype {store_dtype!r}: expected {' or '.join(STORE_DTYPES)}")
    m = load_model(recipe.model, seed=recipe.seed)
    tok, cfg, params = m.tokenizer, m.cfg, m.params
    m.params = None
    if recipe.lora is not None:  # as trainer.build_steps, without a second (JAX) copy
        lcfg = recipe.lora.resolved(cfg)
        trainable = {k: np.asarray(v) for k, v in
                     lora.init_lora(cfg, recipe.lora, jax.random.PRNGKey(recipe.seed)).items()}
        frozen = params
    else:
        lcfg, trainable, frozen = None, params, {}
    del params
    oc = dataclasses.replace(recipe.optim, total_steps=recipe.steps)
    sm = ShardedModel(cfg, lcfg, oc, {k: tuple(v.shape) for k, v in trainable.items()},
                      {k: tuple(v.shape) for k, v in frozen.items()}, recipe.seq_len,
                      vocab_chunk=vocab_chunk)
    tmp.mkdir(parents=True)
    st.save(tmp / STORE, frozen, dtype=STORE_DTYPES[store_dtype])
    del frozen
    init = {f"trainable/{k}": np.asarray(v) for k, v in trainable.items() if np.any(v)}
    st.save(tmp / STATE, init)  # zeros (optimizer moments, accumulators, LoRA B) implied
    del trainable, init, m
    gc.collect()
    tok.save(tmp)
    files = {"weights": file_entry(tmp, STORE), "state": file_entry(tmp, STATE)}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        files[name] = file_entry(tmp, name)
    return sm, files, tok


def manifest_for(recipe: Recipe, sm: ShardedModel, variants, files, tok, store_dtype,
                 signatures) -> Manifest:
    from export.monolithic_bundle import _version
    return Manifest(
        model=sm.cfg.to_dict(), lora=sm.lcfg.to_dict() if sm.lcfg else None,
        optim=sm.optim.to_dict(), data=recipe.data_config().to_dict(), recipe=recipe.to_dict(),
        seq_len=recipe.seq_len, variants=tuple(variants), effective_batch=recipe.batch_size,
        state=state_specs(sm), frozen=(), signatures=tuple(signatures), files=files,
        tokenizer={"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                   "adds_bos": tok.adds_bos},
        tools={"mobiletune": mobiletune.__version__, "jax": _version("jax"),
               "tensorflow": _version("tensorflow-cpu") or _version("tensorflow"),
               "ai-edge-litert": _version("ai-edge-litert")},
        sharded=sm.layout(store_dtype),
        extra={"hf_config": sm.cfg.to_hf_dict(), "base_model": recipe.model})


def export_sharded(recipe: Recipe, out, variants, store_dtype: str = "float32",
                   verify: bool = True, program: bool = True, vocab_chunk: int = 4096) -> dict:
    """Write a sharded bundle; ``program=False`` skips the LiteRT program (tests run the
    chain with ``mobiletune.programs.sharded.JaxCalls`` instead). Returns a report."""
    from export.monolithic_bundle import check_variants, verify_in_fresh_process
    t0 = time.perf_counter()
    out = Path(out)
    variants = check_variants(recipe, variants)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sm, files, tok = write_files(recipe, tmp, store_dtype, vocab_chunk)
    convert_s, program_bytes = 0.0, 0
    if program:
        from export.tflite import build_pure_module, convert
        module, sigs = build_pure_module(sm.signatures(variants))
        flat, convert_s = convert(module, sigs)
        (tmp / PROGRAM).write_bytes(flat)
        files["program"] = file_entry(tmp, PROGRAM)
        program_bytes = len(flat)
    manifest = manifest_for(recipe, sm, variants, files, tok, store_dtype,
                            signature_meta(sm, variants) if program else [])
    atomic.write_text(tmp / MANIFEST, manifest.to_json())
    atomic.replace_dir(tmp, out)
    if verify and program:
        verify_in_fresh_process(out)
    bundle_bytes = sum(p.stat().st_size for p in out.iterdir())
    n_all = sum(int(np.prod(s)) for s in sm.shapes.values())
    n_tr = sum(int(np.prod(sm.shapes[t])) for t in sm.trainable)
    weights_bytes = 4 * n_all
    return {"bundle": str(out), "bundle_bytes": bundle_bytes, "weights_bytes": weights_bytes,
            "ratio": bundle_bytes / weights_bytes, "program_bytes": program_bytes,
            "params": n_all, "trainable_params": n_tr, "store_dtype": store_dtype,
            "convert_seconds": convert_s, "export_seconds": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(), "variants": list(variants), "sharded": True,
            "signatures": len(manifest.signatures)}
