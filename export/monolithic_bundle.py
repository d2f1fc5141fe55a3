"""Recipe -> training bundle directory (monolithic: one program holds the whole model).

    python -m export RECIPE.py --out BUNDLE [--set key=value ...] [--variants 1,2,4]

Writes the bundle into a temporary sibling directory and renames it into place, then
verifies it in a fresh process that imports no JAX or TensorFlow.

For decoding, the program also holds the sharded ``block_decode_<kind>`` / ``norm_decode``
signatures and the bundle each kind's constant-weight skeleton (``export/constant_decode.py``),
with the model's layer layout as ``Manifest.decoding``: the phone decodes layer by layer
over its weights as constants, as from a sharded bundle (the program's own ``decode``
reads the weights from resource variables, ~2.5x slower a token).
"""

from __future__ import annotations

import dataclasses
import time
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
from export.tflite import build_module, build_pure_module, convert
from mobiletune.formats.loading import load_model, peek_config
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.programs.monolithic import Program
from mobiletune.programs.sharded import ShardedModel, table_meta
from mobiletune.runtime import bundle as B
from mobiletune.runtime.metrics import peak_rss_mb
from mobiletune.train.optim import OptimConfig
from mobiletune.train.recipe import Recipe
from mobiletune.train.setup import build_steps

# The monolithic converter's memory grows with the traced program (measured figures:
# README, "Export and the phone"); beyond these limits a sharded export is the way.
MAX_TRAINABLE_PARAMS = 20_000_000
MAX_TOTAL_PARAMS = 150_000_000


def _check_size(recipe: Recipe, n_all: int, n_tr: int | None) -> None:
    if (n_tr or 0) > MAX_TRAINABLE_PARAMS or n_all > MAX_TOTAL_PARAMS:
        raise ExportError(f"{recipe.model}: {n_all:,} params"
                          + (f" ({n_tr:,} trainable)" if n_tr is not None else "")
                          + f" is too large for a monolithic bundle on this machine (limits "
                          f"{MAX_TOTAL_PARAMS:,} / {MAX_TRAINABLE_PARAMS:,} trainable): export it with "
                          f"--sharded (per-block signatures, weights streamed from disk)")


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
    steps = dataclasses.replace(steps, cfg=steps.cfg.replace(matmul=EXPORT_MATMUL))
    n_tr = sum(int(np.prod(v.shape)) for v in trainable.values())
    n_all = n_tr + sum(int(np.prod(v.shape)) for v in frozen.values())
    _check_size(recipe, n_all, n_tr)
    prog = Program(steps, trainable, frozen, recipe.seq_len)
    module, sigs, sig_meta = build_module(prog, prog.frozen_specs(frozen), variants)
    sm, decode = decode_table(steps, trainable, frozen, recipe.seq_len)
    sigs.update(build_pure_module(decode)[1])
    sig_meta += table_meta(decode)
    flat, convert_s = convert(module, sigs)

    tmp = atomic.staging_dir(out)
    (tmp / B.PROGRAM).write_bytes(flat)
    t1 = time.perf_counter()
    files = {}
    consts, skel_bytes = constant_decode.write_skeletons(decode, sm.kinds, tmp, files)
    convert_s += time.perf_counter() - t1
    state = {k: v for k, v in prog.initial_state().items() if np.any(v)}  # zeros are implied
    st.save(tmp / B.STATE, state)
    files.update(program=B.file_entry(tmp, B.PROGRAM), state=B.file_entry(tmp, B.STATE))
    if frozen:
        st.save(tmp / B.BASE, {B.frozen_name(k): np.asarray(v) for k, v in frozen.items()})
        files["base_weights"] = B.file_entry(tmp, B.BASE)
    files.update(tokenizer_files(tok, tmp))
    manifest = B.Manifest(**manifest_fields(recipe, prog.cfg, steps.lcfg, tok, variants),
                          state=prog.state_specs(), frozen=prog.frozen_specs(frozen),
                          signatures=tuple(sig_meta), files=files,
                          decoding=dataclasses.replace(sm.layout("float32"), groups=(),
                                                       opt_leaves={}, decode_consts=consts))
    atomic.write_text(tmp / B.MANIFEST, manifest.to_json())
    atomic.replace_dir(tmp, out)
    if verify:
        verify_in_fresh_process(out)
    # what the phone must have in any case: the weights, the non-zero initial state and
    # the tokenizer; the rest (the program, the manifest) is the bundle's overhead
    needed = 4 * (n_all + sum(int(np.prod(v.shape)) for k, v in state.items()
                              if not k.startswith(B.TRAINABLE)))
    needed += sum(files[n].bytes for n in B.TOKENIZER_FILES)
    rep = write_report(out, {
        "bundle": str(out), "sharded": False, "needed_bytes": needed,
        "program_bytes": len(flat) + skel_bytes, "params": n_all, "trainable_params": n_tr,
        "convert_seconds": convert_s, "export_seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(), "variants": list(variants)})
    rep["ratio"] = rep["bundle_bytes"] / needed
    return rep


def decode_table(steps, trainable: dict, frozen: dict, seq_len: int) -> tuple[ShardedModel, dict]:
    """(the model's sharded layout, its ``block_decode_<kind>`` and ``norm_decode``
    signatures): the per-layer decode programs, over the same HF names as the state. The
    optimizer plays no part in them (a default one stands in: adafactor has no sharded form)."""
    sm = ShardedModel(steps.cfg, steps.lcfg, OptimConfig(),
                      {k: tuple(v.shape) for k, v in trainable.items()},
                      {k: tuple(v.shape) for k, v in frozen.items()}, seq_len)
    table = sm.signatures((1,))
    names = [B.NORM_DECODE, *(B.block_decode_sig(k) for k in sm.kinds)]
    return sm, {n: table[n] for n in names}
