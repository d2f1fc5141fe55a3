"""Trace a ``mobiletune.programs.monolithic.Program`` into a builtin-ops-only LiteRT program.

Route: ``jax2tf.convert`` (native StableHLO) inside a
``tf.Module`` whose ``tf.Variable``s hold the state → SavedModel with one signature per
bundle signature → ``TFLiteConverter`` with TFLITE_BUILTINS only and resource variables.

Two things the converter would get wrong are handled here:
* frozen base weights are variables (zero-initialised, set once by ``set_frozen``), not
  constants: a constant gets a second, constant-folded transposed copy for the backward
  pass, and all-zero initial values are stored as splats, so no weight is stored twice;
* ``STABLEHLO_SCATTER`` (the gradient of an embedding gather) carries its update
  computation as a subgraph of TFL ``ADD``, which the LiteRT kernel rejects: we rewrite
  those to ``STABLEHLO_ADD`` in the flatbuffer.
* ``jax.checkpoint`` (the saved-residual block signatures) marks every residual with a
  ``reduce_precision`` to the residual's own dtype — an identity, which the converter's
  StableHLO importer does not know: such no-op casts are lowered as the identity here.
Any op that is not a builtin (Flex / custom) fails the export with the list of them.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax._src import dtypes as jax_dtypes  # noqa: E402
from jax._src.interpreters import mlir  # noqa: E402
from jax._src.lax import lax as jax_lax  # noqa: E402
from jax.experimental import jax2tf  # noqa: E402

from export.common import ExportError  # noqa: E402
from mobiletune.runtime.bundle import (  # noqa: E402
    APPLY,
    DECODE,
    GET_STATE,
    INFER,
    PREFILL,
    SET_FROZEN,
    SET_STATE,
    Signature,
    TensorSpec,
    accumulate_sig,
    eval_sig,
    input_name,
    signature_shape,
    train_step_sig,
)

_DT = {"float32": tf.float32, "int32": tf.int32}
_REDUCE_PRECISION = mlir._lowerings[jax_lax.reduce_precision_p]


def _reduce_precision_lowering(ctx, operand, *, exponent_bits, mantissa_bits):
    """``reduce_precision`` to its operand's own precision is the identity: lower it so."""
    aval = ctx.avals_in[0]
    if np.issubdtype(aval.dtype, np.floating):
        fi = jax_dtypes.finfo(aval.dtype)
        if (fi.nexp, fi.nmant) == (exponent_bits, mantissa_bits):
            return [operand]
    return _REDUCE_PRECISION(ctx, operand, exponent_bits=exponent_bits,
                             mantissa_bits=mantissa_bits)


mlir.register_lowering(jax_lax.reduce_precision_p, _reduce_precision_lowering)


def _tf_spec(s: TensorSpec, name: str | None = None) -> tf.TensorSpec:
    """The program's input spec for a contract tensor: scalars travel as (1,)."""
    return tf.TensorSpec(signature_shape(s.shape), _DT[s.dtype], name=name or s.name)


def _boundary(s: TensorSpec, name: str | None = None) -> TensorSpec:
    """The manifest's record of that input (its name and boundary shape)."""
    return TensorSpec(name or s.name, signature_shape(s.shape), s.dtype)


def _inside(x, shape):
    """A boundary input back in its logical shape (a (1,) scalar -> 0-d)."""
    return tf.reshape(x, []) if tuple(shape) == () else x


def build_module(program, frozen_specs, variants):
    """(tf.Module, {signature name: concrete function}, [Signature])."""
    m = tf.Module()
    state_specs = program.state_specs()
    m.state = {s.name: tf.Variable(tf.zeros(s.shape, _DT[s.dtype]), name=input_name(s.name))
               for s in state_specs}
    m.frozen = {s.name: tf.Variable(tf.zeros(s.shape, _DT[s.dtype]), name=input_name(s.name))
                for s in frozen_specs}

    def read(vs):
        return {n: v.read_value() for n, v in vs.items()}

    def assign(upd):
        for n, val in upd.items():
            m.state[n].assign(val)

    sigs, meta = {}, []

    def add(name, jax_fn, in_specs, updates_state):
        conv = jax2tf.convert(jax_fn, with_gradient=False)
        spec = {s.name: _tf_spec(s) for s in in_specs}

        def body(args):
            upd, out = conv(read(m.state), read(m.frozen),
                            *[_inside(args[s.name], s.shape) for s in in_specs])
            if updates_state:
                assign(upd)
            return out

        f = tf.function(body, input_signature=[spec], autograph=False)
        sigs[name] = f.get_concrete_function()
        outs = sigs[name].structured_outputs
        meta.append(Signature(name, tuple(_boundary(s) for s in in_specs), tuple(
            TensorSpec(k, tuple(v.shape), v.dtype.name) for k, v in sorted(outs.items()))))

    for k in variants:
        b = program.batch_specs(k)
        add(train_step_sig(k), program.train_step, b, True)
        add(accumulate_sig(k), program.accumulate, b, True)
        add(eval_sig(k), program.eval, b, False)
    add(APPLY, program.apply, (), True)
    add(INFER, program.infer, program.infer_specs(), False)
    add(PREFILL, program.prefill, program.infer_specs(), False)
    add(DECODE, program.decode, program.decode_specs(), False)

    get = tf.function(lambda: read(m.state), input_signature=[], autograph=False)
    sigs[GET_STATE] = get.get_concrete_function()
    meta.append(Signature(GET_STATE, (), state_specs))
    for group, specs in ((SET_STATE, state_specs), (SET_FROZEN, frozen_specs)):
        if not specs:
            continue
        vs = m.state if group == SET_STATE else m.frozen
        in_spec = {s.name: _tf_spec(s, input_name(s.name)) for s in specs}

        f = tf.function(_setter(vs), input_signature=[in_spec], autograph=False)
        sigs[group] = f.get_concrete_function()
        meta.append(Signature(group, tuple(_boundary(s, input_name(s.name)) for s in specs),
                              (TensorSpec("ok", (), "int32"),)))
    return m, sigs, meta


def build_pure_module(table: dict):
    """(tf.Module, {name: concrete function}) for stateless signatures: ``table`` maps a
    name to (fn(dict of inputs) -> dict of outputs, [TensorSpec inputs]) — the sharded
    program, where weights are inputs and the host keeps all state."""
    m = tf.Module()
    sigs = {name: _pure_signature(fn, specs) for name, (fn, specs) in table.items()}
    return m, sigs


def _pure_signature(fn, specs):
    names = [s.name for s in specs]
    conv = jax2tf.convert(lambda *a: fn(dict(zip(names, a))), with_gradient=False)
    spec = {s.name: _tf_spec(s) for s in specs}
    f = tf.function(lambda args: conv(*[_inside(args[s.name], s.shape) for s in specs]),
                    input_signature=[spec], autograph=False)
    return f.get_concrete_function()


def _setter(vs):
    def setter(args):
        for n, v in vs.items():
            v.assign(_inside(args[n], v.shape))
        return {"ok": tf.constant(1, tf.int32)}
    return setter


def convert(module, sigs) -> tuple[bytes, float]:
    """(flatbuffer bytes, seconds). Builtins only; the scatter regions are fixed."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mobiletune-savedmodel-") as d:
        tf.saved_model.save(module, d, signatures=sigs)
        conv = tf.lite.TFLiteConverter.from_saved_model(d, signature_keys=list(sigs))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.experimental_enable_resource_variables = True
        conv._experimental_unfold_large_splat_constant = True
        try:
            flat = conv.convert()
        except Exception as e:  # the converter's own message lists the unsupported ops
            raise ExportError(f"LiteRT conversion failed: {str(e).strip().splitlines()[-1]}") from None
    flat = fix_scatter_regions(flat)
    check_builtins_only(flat)
    return flat, time.perf_counter() - t0


def _model(flat: bytes):
    from tensorflow.lite.python import schema_py_generated as S
    return S, S.ModelT.InitFromObj(S.Model.GetRootAsModel(flat, 0))


def _code(op_code) -> int:
    return max(op_code.builtinCode, op_code.deprecatedBuiltinCode)


def check_builtins_only(flat: bytes) -> None:
    S, model = _model(flat)
    names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}
    bad = set()
    for sg in model.subgraphs:
        for op in sg.operators or []:
            oc = model.operatorCodes[op.opcodeIndex]
            if _code(oc) == S.BuiltinOperator.CUSTOM:
                bad.add((oc.customCode or b"?").decode() if isinstance(oc.customCode, bytes)
                        else str(oc.customCode))
            elif _code(oc) not in names:
                bad.add(f"builtin#{_code(oc)}")
    if bad:
        raise ExportError(f"the program needs non-builtin ops {sorted(bad)}; the LiteRT "
                          f"interpreter cannot run them (Flex is not available on the phone)")


def fix_scatter_regions(flat: bytes) -> bytes:
    """Rewrite TFL ADD -> STABLEHLO_ADD inside STABLEHLO_SCATTER update subgraphs."""
    import flatbuffers
    S, model = _model(flat)
    regions = set()
    for sg in model.subgraphs:
        for op in sg.operators or []:
            if _code(model.operatorCodes[op.opcodeIndex]) == S.BuiltinOperator.STABLEHLO_SCATTER:
                regions.add(op.builtinOptions2.updateComputationSubgraphIndex)
    if not regions:
        return flat
    add_idx = None
    for i, oc in enumerate(model.operatorCodes):
        if _code(oc) == S.BuiltinOperator.STABLEHLO_ADD:
            add_idx = i
    if add_idx is None:
        oc = S.OperatorCodeT()
        oc.builtinCode = S.BuiltinOperator.STABLEHLO_ADD
        oc.deprecatedBuiltinCode = S.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES
        oc.version = 1
        model.operatorCodes.append(oc)
        add_idx = len(model.operatorCodes) - 1
    for r in regions:
        for op in model.subgraphs[r].operators or []:
            if _code(model.operatorCodes[op.opcodeIndex]) == S.BuiltinOperator.ADD:
                op.opcodeIndex = add_idx
                op.builtinOptionsType = S.BuiltinOptions.NONE
                op.builtinOptions = None
    b = flatbuffers.Builder(len(flat) + 1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())

