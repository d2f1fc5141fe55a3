"""The training bundle: the one written contract between the exporter and the phone.

Every name, signature, layout and file of a bundle is spelled here and nowhere else; the
exporter (``export/``, ``mobiletune.programs``) writes what this module describes and the
runtime reads it through this module. Standard library only (it runs on the phone).

Files (``FILE_ROLES`` name them in ``Manifest.files`` with size and sha256)::

    manifest.json           ``Manifest`` (JSON, versioned; validated whole on load)
    program.tflite          builtin-ops-only LiteRT program with the signatures below
    state.safetensors       initial state (tensors that start at zero are left out)
    base.safetensors        monolithic LoRA: the frozen base weights, for ``set_frozen``
    weights.safetensors     sharded: every frozen weight, memory-mapped by the phone
    decode_<kind>.skel      ``block_decode_<kind>`` with the block's weights as constants,
                            their bytes cut out (``ShardedLayout.decode_consts`` says where
                            each layer's weights go back in; sharded: schema 6, monolithic:
                            schema 7, with ``Manifest.decoding`` as its layout)
    tokenizer.json, tokenizer_config.json
    report.json             what the exporter measured (not part of the contract)

State (the names ``get_state`` returns, ``set_state`` takes and checkpoints hold):
``trainable/<hf name>`` the trained tensors, ``acc/<hf name>`` their summed gradients,
``opt/<path>`` the optimizer state (monolithic: the optax tree path; sharded:
``opt/<group>/<leaf>``), ``acc_nll`` / ``acc_count`` the accumulated summed NLL and token
count, ``step`` the optimizer steps taken (int32). ``frozen/<hf name>``: what
``set_frozen`` takes. Build and read names only with ``trainable_name`` & co.

Monolithic signatures (``k`` a micro-batch variant, ``T`` = ``seq_len``), all over one
set of resource variables, so variants can be switched at any step:
  ``train_step_b{k}(inputs, targets, loss_mask) -> loss``        one optimizer step
  ``accumulate_b{k}(inputs, targets, loss_mask) -> nll, count``  add grads to acc/*
  ``apply() -> loss, step``              optimizer on acc/count, then zero acc/*
  ``eval_b{k}(inputs, targets, loss_mask) -> nll, count``        no update
  ``infer(tokens[1,T], last[1]) -> logits[V]``                   next-token logits at ``last``
  ``prefill(tokens[1,T], last[1]) -> logits[V], k[L,T,K,Dh], v[L,T,K,Dh]``  as ``infer``, plus
      every position's keys and values (the KV cache; slots after ``last`` are padding)
  ``decode(token[1,1], pos[1], k_cache[L,T,K,Dh], v_cache[L,T,K,Dh]) -> logits[V],
      k[L,1,K,Dh], v[L,1,K,Dh]``  the token at position ``pos`` attends to cache slots
      ``< pos`` and itself; it returns its own keys/values, which the host writes into slot
      ``pos`` (the cache lives on the host between calls; the program holds none of it)
  ``get_state()`` / ``set_state(<input_name(state name)>...)`` / ``set_frozen(...)``
  and (schema 7) the sharded ``block_decode_<kind>`` and ``norm_decode`` below, weights as
  inputs, over the layout ``Manifest.decoding``: the phone decodes one layer at a time over
  its weights as constants (``decode_<kind>.skel``), as a sharded bundle does
inputs/targets are int32 (k, T); loss_mask float32 (k, T). The loss of an optimizer step is
the summed NLL over counted tokens of the effective batch / their number.

Sharded signatures take the weights as inputs (``W`` prefix; gradients come out with
``G``, optimizer state with ``S``) and hold no variables; the host keeps the state:
``block_fwd_<kind>_b{k}``, ``block_bwd_<kind>_b{k}``, ``norm_fwd_b{k}``, ``norm_bwd_b{k}``,
``head_fwd_b{k}``, ``head_wgrad_b{k}`` (when the head trains), ``opt_<optimizer>``; for
decoding with a KV cache (micro-batch 1, the embedding and the head on the host)
``block_prefill_<kind>(h[1,T,D], W...) -> h, k[1,T,K,Dh], v[1,T,K,Dh]`` (the padded window),
``block_decode_<kind>(h[1,C,D], pos[1], k_cache[1,T,K,Dh], v_cache[1,T,K,Dh], W...) -> h,
k[1,C,K,Dh], v[1,C,K,Dh]``: C positions from ``pos`` (C, the signature's ``h`` shape, is 1
today; rows past the real tokens are padding no real row attends to) over the cache's first
``pos`` slots, returning their keys/values for the host to write; and
``norm_decode(h[1,1,D], W...) -> hn``. The
``ShardedLayout`` says which layers use which block kind, the embedding / norm / head names,
the vocabulary and optimizer chunk sizes, the optimizer groups and their state leaves.

Scalars never cross a signature boundary as 0-d tensors: a scalar input is declared with
shape ``(1,)`` in the program and reshaped inside it (``signature_shape``); the state keeps
its logical shapes. Why: every call through LiteRT's Python ``SignatureRunner`` resizes each
input to the given array's shape, and ai-edge-litert 2.3.0's aarch64 build of
``InterpreterWrapper::ResizeInputTensor`` clears a 0-length shape vector with
``memset(p + 4, 0, 4·n - 4)``, ~2^64 bytes for n = 0: a segfault on every arm64 phone, while
the x86-64 build happens to tolerate it. So the manifest is refused if a signature declares
a 0-d input, and the runner refuses a program that does.

Schema 7 (this one) gave monolithic bundles the constant-weight decode programs and the
layout they need (``Manifest.decoding``); schema 5-6 monolithic bundles decode with the
program's ``decode`` signature. Schema 6 added the constant-weight decode programs (``decode_<kind>.skel``,
``ShardedLayout.decode_consts``); schema 5 bundles are still read (they decode with the
weights as inputs). Schema 5 added the KV-cache decoding signatures (``prefill`` / ``decode``;
sharded: ``block_prefill_*`` / ``block_decode_*`` / ``norm_decode``; side-tuning bundles
have none). Schema 4 added the explicit ``step`` counter and the typed ``steps``,
``hf_config``, ``base_model``, ``thresholds`` and ``sharded`` fields. Older bundles are
refused with the command that re-exports them (1-3 also passed 0-d inputs, or lacked them).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from mobiletune.errors import MobiletuneError

SCHEMA_VERSION = 7
OLDEST_SCHEMA = 5                   # read too: a bundle without the constant-weight decode files
REEXPORT = "mobiletune export RECIPE.py --out BUNDLE [--sharded]"
FORMAT = "mobiletune-training-bundle"

MANIFEST, PROGRAM, STATE = "manifest.json", "program.tflite", "state.safetensors"
BASE, WEIGHTS, REPORT = "base.safetensors", "weights.safetensors", "report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FILE_ROLES = {"program": PROGRAM, "state": STATE, "base_weights": BASE, "weights": WEIGHTS,
              **{n: n for n in TOKENIZER_FILES}}
_DECODE_ROLE = re.compile(r"decode_(k\d+)")   # + one file role per block kind (schema 6)

TRAINABLE, ACC, OPT, FROZEN = "trainable/", "acc/", "opt/", "frozen/"
ACC_NLL, ACC_COUNT, STEP = "acc_nll", "acc_count", "step"
W, G, S = "w__", "g__", "s__"        # sharded inputs: weights, gradients, optimizer state
R = "r__"   # a block's saved residuals: block_fwd_save's outputs, block_bwd_saved's inputs
APPLY, INFER, GET_STATE, SET_STATE, SET_FROZEN = ("apply", "infer", "get_state", "set_state",
                                                  "set_frozen")
PREFILL, DECODE, NORM_DECODE = "prefill", "decode", "norm_decode"   # KV-cache decoding
K_CACHE, V_CACHE = "k_cache", "v_cache"   # decode inputs; the outputs "k", "v" are new rows
OPTIMIZERS = ("decay", "nodecay")    # sharded optimizer signatures: with / without decay
DTYPES = ("float32", "int32", "float16")
STORE_DTYPES = ("float32", "float16", "int8")


class BundleError(MobiletuneError):
    """A bundle that is incomplete, corrupt, from a newer schema, or not for this use."""


# --- names ------------------------------------------------------------------------------------
def trainable_name(hf: str) -> str:
    return TRAINABLE + hf


def acc_name(hf: str) -> str:
    return ACC + hf


def frozen_name(hf: str) -> str:
    return FROZEN + hf


def opt_name(*path: str) -> str:
    """``opt_name("1", "0", "mu")`` (an optax tree path) or ``opt_name(group, leaf)``."""
    return OPT + "/".join(path)


def trainable_part(state: dict) -> dict:
    """{hf name: tensor} of the trainable tensors in a state dict."""
    return {k[len(TRAINABLE):]: v for k, v in state.items() if k.startswith(TRAINABLE)}


def frozen_part(named: dict) -> dict:
    """{hf name: tensor} of ``frozen/`` names."""
    return {k[len(FROZEN):]: v for k, v in named.items() if k.startswith(FROZEN)}


def train_step_sig(k: int) -> str:
    return f"train_step_b{k}"


def accumulate_sig(k: int) -> str:
    return f"accumulate_b{k}"


def eval_sig(k: int) -> str:
    return f"eval_b{k}"


def block_fwd_sig(kind: str, k: int) -> str:
    return f"block_fwd_{kind}_b{k}"


def block_bwd_sig(kind: str, k: int) -> str:
    return f"block_bwd_{kind}_b{k}"


def block_fwd_save_sig(kind: str, k: int) -> str:
    """Optional: ``block_fwd`` that also returns what the backward pass needs (``R`` names)."""
    return f"block_fwd_save_{kind}_b{k}"


def block_bwd_saved_sig(kind: str, k: int) -> str:
    """Optional: ``block_bwd`` from saved residuals, without recomputing the block's matmuls."""
    return f"block_bwd_saved_{kind}_b{k}"


def norm_fwd_sig(k: int) -> str:
    return f"norm_fwd_b{k}"


def norm_bwd_sig(k: int) -> str:
    return f"norm_bwd_b{k}"


def head_fwd_sig(k: int) -> str:
    return f"head_fwd_b{k}"


def head_wgrad_sig(k: int) -> str:
    return f"head_wgrad_b{k}"


def block_decode_sig(kind: str) -> str:
    return f"block_decode_{kind}"


def decode_skeleton_role(kind: str) -> str:
    """The file role (and ``+ ".skel"``, its file name) of a kind's constant-weight decode
    program."""
    return f"decode_{kind}"


def decode_constant_names(inputs) -> list[str]:
    """The inputs of ``block_decode_<kind>`` (TensorSpecs) that its constant-weight
    program holds as constants: every 2-D weight but the LoRA factors (those stay inputs:
    the converter folds the LoRA scale into a constant factor's product)."""
    return [s.name for s in inputs
            if s.name.startswith(W) and len(s.shape) == 2 and ".lora_" not in s.name]


def block_prefill_sig(kind: str) -> str:
    return f"block_prefill_{kind}"


def opt_sig(optimizer: str) -> str:
    return f"opt_{optimizer}"


def side_in_sig(k: int) -> str:
    return f"side_in_b{k}"


def side_layer_sig(k: int) -> str:
    return f"side_layer_b{k}"


def side_out_sig(k: int) -> str:
    return f"side_out_b{k}"


# side-tuning: the names of the side network's weights (the file the server sends back)
SIDE = "side."   # every side weight's name starts with it
SIDE_EMBED_DOWN, SIDE_UP, SIDE_NORM = "side.embed_down.weight", "side.up.weight", "side.norm."


def side_layer_prefix(j: int) -> str:
    """``side.layers.{j}.``: the j-th side layer's gate, down-projection and block."""
    return f"side.layers.{j}."


def input_name(name: str) -> str:
    """The signature input name of a state tensor (TF input names cannot contain '/')."""
    return name.replace("/", "__")


def signature_shape(shape) -> tuple[int, ...]:
    """The shape a tensor of logical ``shape`` has at a signature boundary: a scalar
    travels as ``(1,)`` (see the module docstring), anything else as it is."""
    return tuple(shape) or (1,)


# --- validation -------------------------------------------------------------------------------
class _Kind:
    def __init__(self, desc: str, ok):
        self.desc, self.ok = desc, ok


def _is_int(v):
    return type(v) is int


def _is_num(v):
    return type(v) in (int, float) and math.isfinite(v)


INT = _Kind("an integer", _is_int)
POS = _Kind("a positive integer", lambda v: _is_int(v) and v > 0)
NAT = _Kind("a non-negative integer", lambda v: _is_int(v) and v >= 0)
NUM = _Kind("a number", _is_num)
STR = _Kind("a string", lambda v: type(v) is str and v != "")
BOOL = _Kind("true or false", lambda v: type(v) is bool)
OBJ = _Kind("an object", lambda v: type(v) is dict)
LIST = _Kind("a list", lambda v: type(v) is list)
SHA = _Kind("a sha256 hex digest", lambda v: type(v) is str and re.fullmatch("[0-9a-f]{64}", v))


def _opt(kind: _Kind) -> _Kind:
    return _Kind(f"{kind.desc} or null", lambda v: v is None or kind.ok(v))


def _list_of(kind: _Kind) -> _Kind:
    return _Kind(f"a list of {kind.desc}s", lambda v: type(v) is list and all(map(kind.ok, v)))


def _one_of(*values) -> _Kind:
    return _Kind(" or ".join(map(repr, values)), lambda v: v in values)


SHAPE = _list_of(NAT)
REGION = _Kind("[input name, offset, bytes, transposed]",
               lambda v: type(v) is list and len(v) == 4 and STR.ok(v[0]) and NAT.ok(v[1])
               and POS.ok(v[2]) and BOOL.ok(v[3]))


class _Reader:
    """Typed access to a JSON object; every error names the file and the key path."""

    def __init__(self, d, path: str, source: str):
        self.source, self.path = source, path
        if type(d) is not dict:
            self.fail(f"must be {OBJ.desc}, not {_show(d)}")
        self.d = d

    def fail(self, what: str, key: str | None = None):
        where = self.path + (f".{key}" if key is not None and self.path else key or "")
        raise BundleError(f"{self.source}: key {where!r} {what}; re-export the bundle: {REEXPORT}")

    def get(self, key: str, kind: _Kind):
        if key not in self.d:
            self.fail("is missing", key)
        v = self.d[key]
        if not kind.ok(v):
            self.fail(f"must be {kind.desc}, not {_show(v)}", key)
        return v

    def sub(self, key: str) -> "_Reader":
        self.get(key, OBJ)
        return _Reader(self.d[key], f"{self.path}.{key}" if self.path else key, self.source)

    def items(self, key: str) -> list["_Reader"]:
        base = f"{self.path}.{key}" if self.path else key
        return [_Reader(x, f"{base}[{i}]", self.source)
                for i, x in enumerate(self.get(key, LIST))]


def _show(v) -> str:
    s = json.dumps(v) if not isinstance(v, (bytes, set)) else repr(v)
    return f"{type(v).__name__} {s[:40]}{'...' if len(s) > 40 else ''}"


# --- the manifest's parts ---------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str            # numpy dtype name: float32, int32, float16

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def read(cls, r: _Reader) -> "TensorSpec":
        return cls(r.get("name", STR), tuple(r.get("shape", SHAPE)),
                   r.get("dtype", _one_of(*DTYPES)))


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def read(cls, r: _Reader) -> "Signature":
        sig = cls(r.get("name", STR), tuple(TensorSpec.read(x) for x in r.items("inputs")),
                  tuple(TensorSpec.read(x) for x in r.items("outputs")))
        for s in sig.inputs:
            if s.shape == ():
                raise BundleError(f"{r.source}: signature {sig.name!r} input {s.name!r} is 0-d; "
                                  f"scalars must travel as shape (1,) (see the bundle "
                                  f"contract); re-export: {REEXPORT}")
        return sig


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class LayerEntry:
    prefix: str                                   # "model.layers.3."
    kind: str                                     # a key of ShardedLayout.kinds
    attn: tuple[float, float, int] | None         # Gemma: RoPE base, scaling, window


@dataclass(frozen=True)
class BlockKind:
    frozen: tuple[str, ...]                       # names relative to the layer prefix
    trainable: tuple[str, ...]


@dataclass(frozen=True)
class OptGroup:
    name: str                                     # "layer.3.decay", "outer.nodecay"
    tensors: tuple[str, ...]                      # trainable HF names, flattened in this order
    optimizer: str                                # one of OPTIMIZERS
    size: int                                     # elements of the flat vector


@dataclass(frozen=True)
class OptLeaf:
    name: str                                     # optax tree path, e.g. "1/0/mu"
    shape: tuple[int, ...]                        # for one chunk: (opt_chunk,) or a scalar ()
    dtype: str


@dataclass(frozen=True)
class ConstRegion:
    """Where one weight's bytes go in a decode skeleton: at ``offset`` of the assembled
    program (the skeleton's bytes fill the gaps in order), ``nbytes`` of float32, the weight
    as the signature input ``name`` holds it or, ``transposed``, its transpose."""
    name: str
    offset: int
    nbytes: int
    transposed: bool


@dataclass(frozen=True)
class ShardedLayout:
    store_dtype: str
    vocab_chunk: int
    opt_chunk: int
    layers: tuple[LayerEntry, ...]
    kinds: dict                                   # kind -> BlockKind
    embed: str
    head: str
    norm: tuple[str, ...]
    positions: str | None
    embed_scale: float | None
    clip_norm: float | None
    groups: tuple[OptGroup, ...]
    opt_leaves: dict                              # optimizer -> tuple[OptLeaf, ...]
    decode_consts: dict = field(default_factory=dict)  # kind -> tuple[ConstRegion, ...]

    def opt_state_shape(self, leaf: OptLeaf, group: OptGroup) -> tuple[int, ...]:
        """A leaf shaped like one chunk is stored for the whole group's flat vector; any
        other leaf (the scalar ``count``) is stored once per group."""
        return (group.size,) if leaf.shape == (self.opt_chunk,) else leaf.shape

    def state_specs(self, trainable_shapes: dict) -> tuple[TensorSpec, ...]:
        """The state of a sharded bundle: one spec list for the exporter and the runner."""
        out = [TensorSpec(STEP, (), "int32"), TensorSpec(ACC_NLL, (), "float32"),
               TensorSpec(ACC_COUNT, (), "float32")]
        for hf, shape in trainable_shapes.items():
            out += [TensorSpec(trainable_name(hf), tuple(shape), "float32"),
                    TensorSpec(acc_name(hf), tuple(shape), "float32")]
        for g in self.groups:
            for leaf in self.opt_leaves[g.optimizer]:
                out.append(TensorSpec(opt_name(g.name, leaf.name), self.opt_state_shape(leaf, g),
                                      leaf.dtype))
        return tuple(sorted(out, key=lambda s: s.name))

    def to_dict(self) -> dict:
        return {"store_dtype": self.store_dtype, "vocab_chunk": self.vocab_chunk,
                "opt_chunk": self.opt_chunk,
                "layers": [{"prefix": x.prefix, "kind": x.kind,
                            "attn": None if x.attn is None else list(x.attn)} for x in self.layers],
                "kinds": {k: {"frozen": list(v.frozen), "trainable": list(v.trainable)}
                          for k, v in self.kinds.items()},
                "embed": self.embed, "head": self.head, "norm": list(self.norm),
                "positions": self.positions, "embed_scale": self.embed_scale,
                "clip_norm": self.clip_norm,
                "groups": [{"name": g.name, "tensors": list(g.tensors), "optimizer": g.optimizer,
                            "size": g.size} for g in self.groups],
                "opt_leaves": {o: [{"name": x.name, "shape": list(x.shape), "dtype": x.dtype}
                                   for x in v] for o, v in self.opt_leaves.items()},
                "decode_consts": {k: [[x.name, x.offset, x.nbytes, x.transposed] for x in v]
                                  for k, v in self.decode_consts.items()}}

    @classmethod
    def read(cls, r: _Reader, schema: int = SCHEMA_VERSION) -> "ShardedLayout":
        layers = []
        for x in r.items("layers"):
            attn = x.get("attn", _opt(_list_of(NUM)))
            if attn is not None and len(attn) != 3:
                x.fail("must be [rope base, rope scaling, window] or null", "attn")
            layers.append(LayerEntry(x.get("prefix", STR), x.get("kind", STR),
                                     None if attn is None else (attn[0], attn[1], int(attn[2]))))
        k = r.sub("kinds")
        kinds = {name: BlockKind(tuple(k.sub(name).get("frozen", _list_of(STR))),
                                 tuple(k.sub(name).get("trainable", _list_of(STR))))
                 for name in k.d}
        groups = tuple(OptGroup(g.get("name", STR), tuple(g.get("tensors", _list_of(STR))),
                                g.get("optimizer", _one_of(*OPTIMIZERS)), g.get("size", POS))
                       for g in r.items("groups"))
        o = r.sub("opt_leaves")
        leaves = {}
        for name in o.d:
            if name not in OPTIMIZERS:
                o.fail(f"names an unknown optimizer (known: {list(OPTIMIZERS)})", name)
            leaves[name] = tuple(OptLeaf(x.get("name", STR), tuple(x.get("shape", SHAPE)),
                                         x.get("dtype", _one_of(*DTYPES))) for x in o.items(name))
        lay = cls(r.get("store_dtype", _one_of(*STORE_DTYPES)), r.get("vocab_chunk", POS),
                  r.get("opt_chunk", POS), tuple(layers), kinds, r.get("embed", STR),
                  r.get("head", STR), tuple(r.get("norm", _list_of(STR))),
                  r.get("positions", _opt(STR)), r.get("embed_scale", _opt(NUM)),
                  r.get("clip_norm", _opt(NUM)), groups, leaves,
                  _decode_consts(r) if schema >= 6 else {})
        for i, x in enumerate(lay.layers):
            if x.kind not in lay.kinds:
                r.fail(f"names kind {x.kind!r}, not one of {sorted(lay.kinds)}", f"layers[{i}].kind")
        for i, g in enumerate(lay.groups):
            if g.optimizer not in lay.opt_leaves:
                r.fail(f"has no opt_leaves entry {g.optimizer!r}", f"groups[{i}].optimizer")
        if not lay.layers:
            r.fail("is empty", "layers")
        return lay


@dataclass(frozen=True)
class SideLayout:
    """A side-tuning bundle (``Manifest.side``): the phone runs the backbone's block_fwd
    chain and sends the output of the ``tapped`` layers (``tap_width`` channels) and of the
    last layer; the server trains the side network. For generation the program also has
    the side network's signatures (``side_in``, ``side_layer``, ``side_out``, micro-batch 1)
    whose weights come from a side-weights file holding ``shapes``."""
    config: dict                     # SideConfig.to_dict()
    tapped: tuple[int, ...]
    tap_width: int
    model: dict                      # the side blocks' reduced ModelConfig
    attn: tuple | None               # Gemma: (RoPE base, scaling, window) per side layer
    shapes: dict                     # side weight name -> shape

    def to_dict(self) -> dict:
        return {"config": self.config, "tapped": list(self.tapped), "tap_width": self.tap_width,
                "model": self.model,
                "attn": None if self.attn is None else [list(a) for a in self.attn],
                "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def read(cls, r: _Reader) -> "SideLayout":
        from mobiletune.runtime.side.config import SideConfig
        c = r.sub("config")
        try:
            SideConfig.from_dict(c.d)
        except MobiletuneError as e:
            c.fail(f"is not a valid side config ({e})")
        attn = r.get("attn", _opt(_list_of(_list_of(NUM))))
        shapes = r.sub("shapes")
        return cls(c.d, tuple(r.get("tapped", _list_of(NAT))), r.get("tap_width", POS),
                   _model(r.sub("model")), None if attn is None else tuple(tuple(a) for a in attn),
                   {k: tuple(shapes.get(k, SHAPE)) for k in shapes.d})


def _decode_consts(r: _Reader) -> dict:
    """kind -> regions, in increasing offset, none overlapping (schema 6; the kinds without
    an entry decode over pinned weights)."""
    r.get("decode_consts", OBJ)
    d, out = r.sub("decode_consts"), {}
    for kind in d.d:
        regions = []
        for i, x in enumerate(d.get(kind, _list_of(REGION))):
            regions.append(ConstRegion(*x))
            if i and regions[-2].offset + regions[-2].nbytes > x[1]:
                d.fail(f"[{i}] overlaps the region before it", kind)
        out[kind] = tuple(regions)
    return out


def _files(r: _Reader) -> dict:
    out = {}
    for role in r.d:
        if role in FILE_ROLES:
            path = FILE_ROLES[role]
        elif _DECODE_ROLE.fullmatch(role):
            path = role + ".skel"
        else:
            r.fail(f"is not a file role (known: {sorted(FILE_ROLES)} and decode_<kind>)", role)
        e = r.sub(role)
        out[role] = FileEntry(e.get("path", _one_of(path)), e.get("sha256", SHA),
                              e.get("bytes", NAT))
    return out


@dataclass(frozen=True)
class Manifest:
    model: dict                      # ModelConfig.to_dict()
    lora: dict | None                # LoraConfig.to_dict() (resolved); None: full fine-tuning
    optim: dict                      # OptimConfig.to_dict() (a record: the program holds it)
    data: dict                       # DataConfig.to_dict(): how the phone cuts its data
    recipe: dict                     # the whole resolved recipe (a record)
    seq_len: int
    variants: tuple[int, ...]        # micro-batch sizes with train/accumulate/eval signatures
    effective_batch: int             # examples per optimizer step
    steps: int                       # optimizer steps the recipe asks for (the default)
    state: tuple[TensorSpec, ...]    # everything get_state returns / set_state takes
    frozen: tuple[TensorSpec, ...]   # what set_frozen takes (monolithic LoRA)
    signatures: tuple[Signature, ...]
    files: dict                      # role -> FileEntry
    tokenizer: dict                  # bos_id, eos_id, pad_id, adds_bos
    tools: dict                      # versions of what made it
    hf_config: dict                  # config.json of the model (full fine-tuning writes it)
    base_model: str | None           # what the recipe named as the model (PEFT's base)
    thresholds: dict                 # energy scheduler thresholds (Thresholds.to_dict())
    sharded: ShardedLayout | None = None   # None: a monolithic bundle
    side: SideLayout | None = None   # a side-tuning bundle (sharded, forward only)
    # monolithic, schema 7: the model's layers for decoding over constant weights (no
    # optimizer groups: the program trains); None: decode with the program's ``decode``
    decoding: ShardedLayout | None = None
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT

    @property
    def decode_layout(self) -> ShardedLayout | None:
        """The layout the per-layer decoder runs over (sharded, or a monolithic bundle's
        ``decoding``); None: a monolithic bundle that decodes with its ``decode``."""
        return self.sharded or self.decoding

    def signature(self, name: str) -> Signature:
        for s in self.signatures:
            if s.name == name:
                return s
        raise BundleError(f"manifest has no signature {name!r}; it has: "
                          f"{', '.join(s.name for s in self.signatures)}")

    def to_json(self) -> str:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(variants=list(self.variants), state=[s.to_dict() for s in self.state],
                 frozen=[s.to_dict() for s in self.frozen],
                 signatures=[s.to_dict() for s in self.signatures],
                 files={k: v.to_dict() for k, v in self.files.items()},
                 sharded=None if self.sharded is None else self.sharded.to_dict(),
                 decoding=None if self.decoding is None else self.decoding.to_dict(),
                 side=None if self.side is None else self.side.to_dict())
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d, source: str = "manifest") -> "Manifest":
        r = _Reader(d, "", source)
        if d.get("format") != FORMAT:
            raise BundleError(f"{source}: not a mobiletune training bundle (format "
                              f"{d.get('format')!r})")
        v = r.get("schema_version", INT)
        if v > SCHEMA_VERSION:
            raise BundleError(f"{source}: schema_version {v} is newer than this mobiletune "
                              f"understands ({SCHEMA_VERSION}); upgrade mobiletune on this device")
        if v < OLDEST_SCHEMA:
            raise BundleError(f"{source}: schema_version {v} bundles are not read by this "
                              f"mobiletune (schema 1-2 passed scalars as 0-d signature inputs, "
                              f"which crash ai-edge-litert 2.3.0 on arm64; 3 lacked the step "
                              f"counter; 4 lacked the KV-cache decoding signatures); re-export "
                              f"it: {REEXPORT}")
        m = cls(model=_model(r.sub("model")), lora=_lora(r), optim=r.sub("optim").d,
                data=_data(r.sub("data")), recipe=r.sub("recipe").d,
                seq_len=r.get("seq_len", POS), variants=tuple(r.get("variants", _list_of(POS))),
                effective_batch=r.get("effective_batch", POS), steps=r.get("steps", POS),
                state=tuple(TensorSpec.read(x) for x in r.items("state")),
                frozen=tuple(TensorSpec.read(x) for x in r.items("frozen")),
                signatures=tuple(Signature.read(x) for x in r.items("signatures")),
                files=_files(r.sub("files")), tokenizer=_tokenizer(r.sub("tokenizer")),
                tools=r.sub("tools").d, hf_config=r.sub("hf_config").d,
                base_model=r.get("base_model", _opt(STR)),
                thresholds=_thresholds(r.sub("thresholds")),
                sharded=None if r.get("sharded", _opt(OBJ)) is None
                else ShardedLayout.read(r.sub("sharded"), v),
                side=None if r.get("side", _opt(OBJ)) is None else SideLayout.read(r.sub("side")),
                decoding=None if v < 7 or r.get("decoding", _opt(OBJ)) is None
                else ShardedLayout.read(r.sub("decoding"), v),
                schema_version=v, format=FORMAT)
        m._check(r)
        return m

    def _check(self, r: _Reader) -> None:
        if self.decoding is not None and (self.sharded is not None or self.decoding.groups):
            r.fail("is for monolithic bundles, and holds no optimizer groups", "decoding")
        if self.side is not None and self.sharded is None:
            r.fail("needs a sharded layout (side-tuning bundles run the backbone per block)",
                   "side")
        if not self.variants or any(self.effective_batch % k for k in self.variants):
            r.fail(f"{list(self.variants)} must be non-empty and divide effective_batch "
                   f"{self.effective_batch}", "variants")
        names = {s.name for s in self.state}
        for need in (STEP, ACC_NLL, ACC_COUNT):
            if need not in names:
                r.fail(f"lacks the tensor {need!r}", "state")
        need = {"state", *TOKENIZER_FILES,  # "program": checked by open_bundle (tests omit it)
                *(["weights"] if self.sharded is not None else []),
                *(["base_weights"] if self.frozen else [])}
        missing = sorted(need - set(self.files))
        if missing:
            r.fail(f"lacks the {missing[0]!r} file", "files")
        if self.sharded is not None:
            shapes = {k[len(TRAINABLE):]: s.shape for k, s in
                      ((s.name, s) for s in self.state) if k.startswith(TRAINABLE)}
            want = self.sharded.state_specs(shapes)
            for i, g in enumerate(self.sharded.groups):
                unknown = [t for t in g.tensors if t not in shapes]
                if unknown:
                    r.fail(f"names {unknown[0]!r}, not a trainable tensor of the state",
                           f"sharded.groups[{i}].tensors")
                if sum(math.prod(shapes[t]) for t in g.tensors) != g.size:
                    r.fail("is not the number of elements of its tensors", f"sharded.groups[{i}].size")
            if tuple(sorted(self.state, key=lambda s: s.name)) != want:
                got = {s.name: s for s in self.state}
                bad = next((w.name for w in want if got.get(w.name) != w),
                           next(iter(sorted(names - {w.name for w in want})), "?"))
                r.fail(f"does not match the sharded layout (first difference: {bad!r})", "state")
        sigs = {s.name for s in self.signatures}
        lost = sorted(set(self.required_signatures()) - sigs)
        if lost:
            r.fail(f"lacks the signature {lost[0]!r}", "signatures")
        lay, key = (self.sharded, "sharded") if self.sharded else (self.decoding, "decoding")
        if self.decoding is not None:
            self._check_decoding(r)
        consts = lay.decode_consts if lay else {}
        for role in self.files:
            kind = _DECODE_ROLE.fullmatch(role)
            if kind and kind[1] not in consts:
                r.fail(f"has no regions for the {role!r} file", f"{key}.decode_consts")
        for kind, regions in consts.items():
            where = f"{key}.decode_consts.{kind}"
            if kind not in lay.kinds:
                r.fail(f"is not a block kind ({sorted(lay.kinds)})", where)
            if decode_skeleton_role(kind) not in self.files:
                r.fail(f"has no {decode_skeleton_role(kind)!r} file", where)
            inputs = self.signature(block_decode_sig(kind)).inputs
            want = decode_constant_names(inputs)
            if sorted(x.name for x in regions) != sorted(want):
                r.fail(f"holds {sorted(x.name for x in regions)}; the constant weights of "
                       f"{block_decode_sig(kind)} are {sorted(want)}", where)
            shapes = {x.name: x.shape for x in inputs}
            for x in regions:
                if 4 * math.prod(shapes[x.name]) != x.nbytes:
                    r.fail(f"{x.name!r} {shapes[x.name]} is not {x.nbytes} float32 bytes", where)

    def _check_decoding(self, r: _Reader) -> None:
        """A monolithic bundle's ``decoding``: one entry per layer of the model, each kind's
        weights the inputs of its ``block_decode``, every weight named one of the bundle's."""
        lay, n = self.decoding, self.model["num_layers"]
        if len(lay.layers) != n:
            r.fail(f"has {len(lay.layers)} entries; the model has {n} layers", "decoding.layers")
        have = {s.name[len(TRAINABLE):] for s in self.state if s.name.startswith(TRAINABLE)}
        have |= {s.name[len(FROZEN):] for s in self.frozen}
        for kind, names in lay.kinds.items():
            inputs = {s.name for s in self.signature(block_decode_sig(kind)).inputs}
            want = {W + x for x in names.frozen + names.trainable}
            if want != {x for x in inputs if x.startswith(W)}:
                r.fail(f"are not the weight inputs of {block_decode_sig(kind)}",
                       f"decoding.kinds.{kind}")
        for i, x in enumerate(lay.layers):
            k = lay.kinds[x.kind]
            lost = [x.prefix + w for w in k.frozen + k.trainable if x.prefix + w not in have]
            if lost:
                r.fail(f"needs {lost[0]!r}, not a weight of the bundle", f"decoding.layers[{i}]")
        for field_ in ("embed", "head", "positions"):
            name = getattr(lay, field_)
            if name is not None and name not in have:
                r.fail(f"{name!r} is not a weight of the bundle", f"decoding.{field_}")
        lost = [x for x in lay.norm if x not in have]
        if lost:
            r.fail(f"{lost[0]!r} is not a weight of the bundle", "decoding.norm")

    def required_signatures(self) -> list[str]:
        """Every signature the runtime calls for this bundle."""
        ks = self.variants
        if self.side is not None:
            kinds = {x.kind for x in self.sharded.layers}
            ladder = self.side.config.get("cut") is None   # a cut side network has no program
            return sorted({*(block_fwd_sig(kind, k) for kind in kinds for k in ks), norm_fwd_sig(1),
                           *((side_in_sig(1), side_layer_sig(1), side_out_sig(1)) if ladder else ())})
        if self.sharded is None:
            out = [APPLY, INFER, PREFILL, DECODE, GET_STATE, SET_STATE]
            out += [SET_FROZEN] if self.frozen else []
            if self.decoding is not None:
                out += [NORM_DECODE, *{block_decode_sig(x.kind) for x in self.decoding.layers}]
            return out + [f(k) for k in ks for f in (train_step_sig, accumulate_sig, eval_sig)]
        lay = self.sharded
        trained = {s.name[len(TRAINABLE):] for s in self.state if s.name.startswith(TRAINABLE)}
        out = [opt_sig(g.optimizer) for g in lay.groups] + [NORM_DECODE]
        out += [f(kind) for kind in {x.kind for x in lay.layers}
                for f in (block_prefill_sig, block_decode_sig)]
        for k in ks:
            out += [norm_fwd_sig(k), norm_bwd_sig(k), head_fwd_sig(k)]
            out += [head_wgrad_sig(k)] if lay.head in trained else []
            out += [f(kind, k) for kind in {x.kind for x in lay.layers}
                    for f in (block_fwd_sig, block_bwd_sig)]
        return sorted(set(out))


_ANNOTATION_KINDS = {"str": STR, "int": POS, "float": NUM, "bool": BOOL, "dict": OBJ,
                     "int | None": _opt(INT), "float | None": _opt(NUM),
                     "tuple[str, ...]": _list_of(STR)}


def _model(r: _Reader) -> dict:
    """A whole ``ModelConfig`` (standard library only, in ``mobiletune.families``): every
    field present with its declared type, and a config the model code accepts."""
    from mobiletune.families.config import ModelConfig
    for f in fields(ModelConfig):
        r.get(f.name, _ANNOTATION_KINDS[str(f.type)])
    try:
        ModelConfig.from_dict(r.d)
    except MobiletuneError as e:
        r.fail(f"is not a valid model config ({e})")
    return r.d


def _lora(r: _Reader) -> dict | None:
    """The resolved LoraConfig (``models.lora``; its fields are spelled out here because
    that module needs JAX and this one runs on the phone)."""
    if r.get("lora", _opt(OBJ)) is None:
        return None
    x = r.sub("lora")
    x.get("r", POS), x.get("alpha", NUM), x.get("dropout", NUM), x.get("use_rslora", BOOL)
    x.get("target_modules", _Kind("a list of module names or a regex",
                                  lambda v: type(v) is str or _list_of(STR).ok(v)))
    x.get("layers_to_transform", _opt(_list_of(NAT)))
    x.get("last_n_layers", _Kind("null (resolved into layers_to_transform)", lambda v: v is None))
    return x.d


def _complete(r: _Reader, cls) -> None:
    """Every field of the dataclass ``cls`` is written out (a missing one is damage, not a
    default)."""
    for f in fields(cls):
        if f.name not in r.d:
            r.fail("is missing", f.name)


def _data(r: _Reader) -> dict:
    from mobiletune.runtime.data import DataConfig  # numpy; imported where first needed
    _complete(r, DataConfig)
    try:
        DataConfig.from_dict(r.d)
    except MobiletuneError as e:
        r.fail(f"is not a valid data config ({e})")
    return r.d


def _tokenizer(r: _Reader) -> dict:
    for k in ("bos_id", "eos_id", "pad_id"):
        r.get(k, _opt(NAT))
    r.get("adds_bos", BOOL)
    return r.d


def _thresholds(r: _Reader) -> dict:
    from mobiletune.runtime.energy.scheduler import Thresholds
    _complete(r, Thresholds)
    try:
        Thresholds.from_dict(r.d)
    except MobiletuneError as e:
        r.fail(f"are not valid scheduler thresholds ({e})")
    return r.d


# --- files ------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(bundle_dir: Path, name: str) -> FileEntry:
    p = Path(bundle_dir) / name
    return FileEntry(name, sha256_file(p), p.stat().st_size)


def read_manifest(bundle_dir: str | Path) -> Manifest:
    d = Path(bundle_dir)
    p = d / MANIFEST
    if not d.is_dir():
        raise BundleError(f"{d}: no such bundle directory")
    if not p.is_file():
        raise BundleError(f"{d}: no {MANIFEST} (not a training bundle)")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{p}: not valid JSON ({e})") from None
    if type(raw) is not dict:
        raise BundleError(f"{p}: not a JSON object")
    return Manifest.from_dict(raw, str(p))


def verify_files(bundle_dir: str | Path, m: Manifest) -> None:
    """Every file the manifest names exists with its recorded size and sha256."""
    d = Path(bundle_dir)
    for role, e in m.files.items():
        p = d / e.path
        if not p.is_file():
            raise BundleError(f"{p}: missing ({role} file of the bundle)")
        size = p.stat().st_size
        if size != e.bytes:
            raise BundleError(f"{p}: {size} bytes, the manifest says {e.bytes} "
                              f"(truncated or replaced {role} file)")
        if sha256_file(p) != e.sha256:
            raise BundleError(f"{p}: sha256 does not match the manifest ({role} file changed)")
