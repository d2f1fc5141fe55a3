"""Read a llama.cpp GGUF file into Hugging Face-named float32 parameters and a ModelConfig.

``read_gguf(path)`` dequantizes every tensor (any type ``gguf.quants.dequantize`` knows:
F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, IQ*, ...), renames it to its Hugging
Face state-dict name and undoes what llama.cpp's ``convert_hf_to_gguf.py`` changed. The
names, the config keys and these fixups come from the family's spec (``FamilySpec.gguf``;
the parameter shapes from ``FamilySpec.param_shapes``):

* ``llama``: Q/K rows were permuted (``LlamaModel.permute``) for llama.cpp's RoPE; we
  permute them back. ``qwen2`` and ``gemma3`` are not permuted by llama.cpp.
* ``gemma3``: every ``*norm.weight`` (incl. q/k norms) is stored as ``1 + w``; HF stores
  ``w`` and computes ``x * (1 + w)``, so we subtract 1.
* ``gpt2``: Conv1D weights (c_attn, c_proj, c_fc) were transposed to (out, in); we
  transpose them back to transformers' (in, out). llama.cpp also writes ``output.weight``
  as a copy of ``token_embd``; a byte-identical copy is treated as a tied head.

GGUF shapes are ggml ``ne`` order (fastest dimension first); numpy order is the reverse, so
a (out, in) torch Linear weight is stored with ``ne = (in, out)`` and comes back as (out, in).

The file is parsed by ``parse_gguf`` below (also used by ``gguf_tokenizer``), not by
``gguf.GGUFReader``, which decodes every element of every metadata array into its own numpy
view (slow for Gemma 3's 262,144-piece vocabulary: benchmarks/README.md). From the
``gguf`` package we use only ``gguf.quants.dequantize`` and the type tables.

Metadata: ``GGUFCheckpoint.metadata`` holds every key/value as plain Python values (plus
GGUFReader's ``GGUF.version``/``GGUF.tensor_count``/``GGUF.kv_count``) except arrays longer
than ``_MAX_INLINE_ARRAY`` entries (the tokenizer's tokens, scores, token_type and merges),
which are decoded on demand by ``GGUFCheckpoint.read_array(key)`` (the checkpoint keeps the
file memory-mapped for that). ``config.vocab_size`` is the embedding's row count.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune import families
from mobiletune.errors import CheckpointError
from mobiletune.families import ConfigError, FamilySpec, ModelConfig

_MAX_INLINE_ARRAY = 1024
_CHUNK_BYTES = 1 << 18  # quantized bytes handed to gguf's dequantize per call


@dataclass
class GGUFCheckpoint:
    """A GGUF file read into HF-named float32 ``params`` (HF shapes) plus its ``config``."""
    config: ModelConfig
    params: dict[str, np.ndarray]
    metadata: dict[str, Any]
    path: Path
    quant_types: dict[str, str] = field(default_factory=dict)  # HF name -> GGML type name
    _file: GGUFFile | None = field(default=None, repr=False, compare=False)  # big arrays

    def read_array(self, key: str) -> list:
        """A metadata array left out of ``metadata`` for its size (e.g. tokenizer.ggml.tokens)."""
        if key in self.metadata:
            return self.metadata[key]
        if self._file is None or key not in self._file.arrays:
            raise CheckpointError(f"{self.path}: no metadata key {key!r}")
        return self._file.read_array(key)


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read ``path`` (a llama.cpp GGUF of a ``llama``/``qwen2``/``gemma3``/``gpt2`` model).

    Returns HF-named float32 params whose names and shapes equal what the config implies.
    Raises CheckpointError (naming the file and the tensor or key) for a missing, truncated
    or corrupt file, an unsupported architecture or tensor type, or a missing, unexpected
    or wrongly shaped tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    file = parse_gguf(path)
    data = _tensor_data(file)
    metadata = file.metadata
    arch = metadata.get("general.architecture")
    spec = families.GGUF_ARCHS.get(arch) if isinstance(arch, str) else None
    if spec is None:
        raise CheckpointError(f"{path}: unsupported architecture {arch!r} (key "
                              f"general.architecture); supported: {list(families.GGUF_ARCHS)}")
    tensors = {name: t.ne for name, t in file.tensors.items()}
    tied_copy = (spec.gguf.head_may_copy_embed and "output.weight" in data
                 and "token_embd.weight" in data
                 and _same_bytes(data["output.weight"], data["token_embd.weight"]))
    if tied_copy:
        del tensors["output.weight"]
    config = _config(path, spec, metadata, tensors)

    expected = spec.param_shapes(config)
    names = {}
    for name, ne in tensors.items():
        hf = _hf_name(spec, name)
        if hf is None or hf not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for a {arch} model "
                                  f"(maps to {hf or 'no Hugging Face name'})")
        shape = ne if _conv1d_weight(spec, hf) else ne[::-1]  # numpy order, Conv1D transposed
        if shape != expected[hf]:
            raise CheckpointError(f"{path}: tensor {name!r} ({hf}) has shape {shape} but the "
                                  f"config implies {expected[hf]}")
        names[hf] = name
    missing = sorted(set(expected) - set(names))
    if missing:
        listed = ", ".join(f"{_gguf_name(spec, m)} ({m})" for m in missing[:5])
        raise CheckpointError(f"{path}: missing tensor(s) {listed}"
                              f"{' ...' if len(missing) > 5 else ''} for a {arch} model "
                              f"with {config.num_layers} layers")

    params, qtypes = {}, {}
    for hf, name in names.items():
        qtype, raw = data[name]
        params[hf] = _convert(path, spec, config, hf, name, qtype, raw, expected[hf])
        qtypes[hf] = qtype.name
    return GGUFCheckpoint(config, params, metadata, path, qtypes, file)


# --- the GGUF container (shared with gguf_tokenizer) -------------------------------------------
# Little-endian v2/v3: "GGUF", version u32, tensor count u64, key/value count u64; the key/value
# pairs (key string, value type u32, value); per tensor: name string, n_dims u32, ne u64[n_dims],
# GGML type u32, data offset u64; padding to general.alignment (32); the tensor data. A string is
# a u64 byte count and UTF-8 bytes; an array is item type u32, count u64 and the items.
STRING, ARRAY = 8, 9
_SCALARS = {t: struct.Struct("<" + c) for t, c in {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
    12: "d"}.items()}  # GGUF value type -> its little-endian struct (also a numpy dtype code)
_U32, _U64 = _SCALARS[4], _SCALARS[10]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    ggml_type: int       # a gguf.GGMLQuantizationType value
    offset: int          # of its data in the file


@dataclass(frozen=True)
class _Array:
    """A metadata array not decoded yet: where its items start."""
    item_type: int
    count: int
    offset: int


@dataclass
class GGUFFile:
    """A parsed GGUF header: ``metadata`` in file order (plain Python values; arrays longer
    than the parser's ``lazy_above`` are in ``arrays`` instead, see ``read_array``), and the
    tensors' layout. The file stays memory-mapped for the arrays and the tensor data."""
    path: Path
    metadata: dict[str, Any]
    arrays: dict[str, _Array]
    tensors: dict[str, TensorInfo]
    buffer: mmap.mmap = field(repr=False)

    def read_array(self, key: str) -> list:
        """Decode the array ``arrays[key]`` (strings as UTF-8, numbers as Python numbers)."""
        a = self.arrays[key]
        return _Cursor(self.buffer, a.offset).array(a.item_type, a.count)

    def bytes_at(self, offset: int, n_bytes: int) -> np.ndarray:
        """A read-only uint8 view of the file."""
        return np.frombuffer(self.buffer, np.uint8, n_bytes, offset)


def parse_gguf(path: str | Path, lazy_above: int | None = _MAX_INLINE_ARRAY,
               tensors: bool = True) -> GGUFFile:
    """Parse the header of the GGUF file ``path``: the key/value metadata (arrays of more than
    ``lazy_above`` items are only located, for ``GGUFFile.read_array``) and, with ``tensors``,
    the tensor table. Raises CheckpointError naming the file if it is not a readable GGUF."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, buffer, lazy_above, tensors)
    except CheckpointError:
        raise
    except (struct.error, ValueError, KeyError, IndexError, OverflowError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt "
                              f"header): {type(e).__name__}: {e}") from None


def _parse(path: Path, buffer: mmap.mmap, lazy_above: int | None, with_tensors: bool) -> GGUFFile:
    cur = _Cursor(buffer, 4)
    version = cur.scalar(4)
    if version & 0xFFFF == 0:
        raise CheckpointError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
    n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
    metadata: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors,
                                "GGUF.kv_count": n_kv}
    arrays: dict[str, _Array] = {}
    alignment = 32
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.scalar(4)
        if key in metadata or key in arrays:
            raise ValueError(f"duplicate key {key!r}")
        value = cur.value(vtype, lazy_above)
        (arrays if isinstance(value, _Array) else metadata)[key] = value
        if key == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                raise ValueError(f"general.alignment must be a power of two (uint32): {value!r}")
            alignment = value
    tensors: dict[str, TensorInfo] = {}
    if with_tensors:
        infos = []
        for _ in range(n_tensors):
            name, n_dims = cur.string(), cur.scalar(4)
            ne = struct.unpack_from(f"<{n_dims}Q", buffer, cur.pos)
            cur.pos += 8 * n_dims
            infos.append((name, ne, cur.scalar(4), cur.scalar(10)))
        data_start = -cur.pos % alignment + cur.pos
        for name, ne, ggml_type, offset in infos:
            if name in tensors:
                raise ValueError(f"duplicate tensor {name!r}")
            tensors[name] = TensorInfo(name, ne, ggml_type, data_start + offset)
    return GGUFFile(path, metadata, arrays, tensors, buffer)


class _Cursor:
    """Reads GGUF values from ``buf`` at ``pos``, advancing it."""

    def __init__(self, buf, pos: int):
        self.buf, self.pos = buf, pos

    def scalar(self, vtype: int) -> Any:
        s = _SCALARS[vtype]
        (value,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return value

    def string(self) -> str:
        (n,) = _U64.unpack_from(self.buf, self.pos)
        start, self.pos = self.pos + 8, self.pos + 8 + n
        if self.pos > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        return self.buf[start:self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int, lazy_above: int | None = None) -> Any:
        """One value; an array of more than ``lazy_above`` items is skipped, giving an _Array."""
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            return self.scalar(vtype)
        item_type, count = self.scalar(4), self.scalar(10)
        if lazy_above is None or count <= lazy_above:
            return self.array(item_type, count)
        lazy = _Array(item_type, count, self.pos)
        self.skip(item_type, count)
        return lazy

    def array(self, item_type: int, count: int) -> list:
        buf, pos = self.buf, self.pos
        if item_type == STRING:  # the hot loop: 262,144 strings for Gemma's vocabulary
            unpack, items = _U64.unpack_from, []
            for _ in range(count):
                (n,) = unpack(buf, pos)
                items.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            if pos > len(buf):
                raise ValueError("a string runs past the end of the file")
            self.pos = pos
            return items
        if item_type == ARRAY:
            return [self.array(self.scalar(4), self.scalar(10)) for _ in range(count)]
        s = _SCALARS[item_type]
        self.pos += count * s.size
        return np.frombuffer(buf, s.format, count, pos).tolist()

    def skip(self, item_type: int, count: int) -> None:
        if item_type == STRING:
            buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
            for _ in range(count):
                pos += 8 + unpack(buf, pos)[0]
            self.pos = pos
        elif item_type == ARRAY:
            for _ in range(count):
                self.skip(self.scalar(4), self.scalar(10))
        else:
            self.pos += count * _SCALARS[item_type].size
        if self.pos > len(self.buf):
            raise ValueError("an array runs past the end of the file")


# --- tensor data -----------------------------------------------------------------------------
def _tensor_data(file: GGUFFile) -> dict[str, tuple[Any, np.ndarray]]:
    """name -> (GGMLQuantizationType, its bytes as a uint8 (rows, row bytes) view of the file),
    checking every tensor's type, row length and extent, in file order."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    out, size = {}, len(file.buffer)
    for t in file.tensors.values():
        try:
            qtype = GGMLQuantizationType(t.ggml_type)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(f"{file.path}: tensor {t.name!r} has unknown GGML type "
                                  f"{t.ggml_type}") from None
        ne = t.ne or (1,)
        if ne[0] % block:
            raise CheckpointError(f"{file.path}: tensor {t.name!r} has rows of {ne[0]} values, "
                                  f"not a multiple of the {qtype.name} block size {block}")
        rows, row_bytes = math.prod(ne[1:]), ne[0] // block * type_size
        end = t.offset + rows * row_bytes
        if end > size:
            raise CheckpointError(f"{file.path}: truncated GGUF file: tensor {t.name!r} needs "
                                  f"bytes up to {end}, the file has {size}")
        out[t.name] = qtype, file.bytes_at(t.offset, rows * row_bytes).reshape(rows, row_bytes)
    return out


def _same_bytes(a: tuple[Any, np.ndarray], b: tuple[Any, np.ndarray]) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1])


def _dequantize(path: Path, name: str, qtype, raw: np.ndarray) -> np.ndarray:
    """A new float32 (rows, row length) array from ``raw``, a uint8 (rows, row bytes) view of
    the file. gguf's dequantize works 16 rows per step; giving it ~256 KiB at a time as one
    row is 1.5-2x faster (the quant blocks are independent, so the values are the same) and
    writes straight into the result, without a second full-size copy."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, row_bytes = raw.shape
    out = np.empty((rows, row_bytes // type_size * block), np.float32)
    step = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    try:
        for i in range(0, rows, step):
            out[i:i + step] = dequantize(raw[i:i + step].reshape(1, -1), qtype).reshape(
                -1, out.shape[1])
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {name!r} has GGML type {qtype.name}, which "
                              f"gguf cannot dequantize") from None
    return out


def _convert(path: Path, spec: FamilySpec, cfg: ModelConfig, hf: str, name: str, qtype,
             raw: np.ndarray, shape: tuple) -> np.ndarray:
    """Dequantize one tensor to float32 in HF layout, undoing the spec's GGUF fixups."""
    g = spec.gguf
    w = _dequantize(path, name, qtype, raw)
    if _conv1d_weight(spec, hf):
        w = np.ascontiguousarray(w.T)
    w = w.reshape(shape)
    module = hf.rsplit(".", 1)[0]
    heads = next((h for m, h in g.permuted.items() if module.endswith("." + m)), None)
    if heads is not None:
        w = _unpermute(w, getattr(cfg, heads))
    if g.norm_shift and hf.endswith("norm.weight"):
        w -= g.norm_shift
    return w


def _conv1d_weight(spec: FamilySpec, hf: str) -> bool:
    """A Conv1D weight: stored (out, in) by llama.cpp, (in, out) by transformers."""
    return hf.endswith(".weight") and spec.is_conv1d(hf[: -len(".weight")])


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's ``LlamaModel.permute``: per head, llama.cpp stored the
    rows as interleaved (x0, x_half, x1, x_half+1, ...) pairs; restore HF's halves layout."""
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


# --- names -----------------------------------------------------------------------------------
def _globals(spec: FamilySpec) -> dict[str, str]:
    """GGUF global tensor stem -> HF module: llama.cpp's names for every architecture, mapped
    onto the spec's embedding, positions, final norm and head."""
    out = {"token_embd": spec.embed, "position_embd": spec.positions,
           "output_norm": spec.final_norm[0], "output": spec.head}
    return {g: h.rsplit(".", 1)[0] for g, h in out.items() if h is not None}


def _hf_name(spec: FamilySpec, name: str) -> str | None:
    """The HF name of the GGUF tensor ``name`` (``blk.N.<stem>.weight``, ``output.weight``)."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    parts = stem.split(".")
    glob, blocks = _globals(spec), spec.gguf.blocks
    if len(parts) == 1 and parts[0] in glob:
        return f"{glob[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in blocks:
        return f"{spec.prefix(int(parts[1]))}{blocks[parts[2]]}.{suffix}"
    return None


def _gguf_name(spec: FamilySpec, hf: str) -> str:
    """The inverse of ``_hf_name`` (for error messages)."""
    stem, suffix = hf.rsplit(".", 1)
    for g, h in _globals(spec).items():
        if h == stem:
            return f"{g}.{suffix}"
    i, rest = stem[len(spec.layer_prefix.split("{i}")[0]):].split(".", 1)
    return next(f"blk.{i}.{g}.{suffix}" for g, h in spec.gguf.blocks.items() if h == rest)


# --- config ----------------------------------------------------------------------------------
def _f32(x) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06. Undo that."""
    return float(str(np.float32(x)))


class _Metadata:
    """A GGUF's metadata as a family's ``GGUFSpec.config`` reads it: keys after ``<arch>.``,
    and the tensors' ggml shapes."""

    def __init__(self, path: Path, arch: str, md: dict, tensors: dict[str, tuple[int, ...]]):
        self.path, self.arch, self.md, self.tensors = path, arch, md, tensors

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as stored (a per-layer list stays a list)."""
        return self.md.get(f"{self.arch}.{key}", default)

    def get(self, key: str, default: Any = KeyError) -> Any:
        """The value, a per-layer list collapsed to its one value; no default: required."""
        v = self.md.get(f"{self.arch}.{key}", default)
        if v is KeyError:
            raise CheckpointError(f"{self.path}: missing metadata key {self.arch}.{key}")
        if isinstance(v, list):  # per-layer values (e.g. head_count); we need them uniform
            if len(set(v)) != 1:
                raise CheckpointError(f"{self.path}: metadata {self.arch}.{key} varies per "
                                      f"layer: {v}")
            v = v[0]
        return v

    def f32(self, key: str, default: Any = KeyError) -> float:
        """A float the file stored as float32, as the decimal it was written from."""
        return _f32(self.get(key, default))


def _config(path: Path, spec: FamilySpec, md: dict, tensors: dict[str, tuple[int, ...]]
            ) -> ModelConfig:
    """The config the metadata describes; ``tensors`` maps names to ggml shapes (``ne``)."""
    g = spec.gguf
    meta = _Metadata(path, g.arch, md, tensors)
    get = meta.get
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = next((v for v in (get(k, None) for k in g.head_dim_keys) if v is not None), None)
    head_dim = int(head_dim or hidden // heads)
    n_layers = int(get("block_count"))
    eps = meta.f32(g.eps_key)
    kw: dict[str, Any] = dict(
        family=spec.name, vocab_size=tensors["token_embd.weight"][-1],
        hidden_size=hidden, num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length", 4 * hidden)),
        max_position=int(get("context_length")), norm_eps=eps,
        tie_embeddings="output.weight" not in tensors, hidden_act=spec.hidden_act,
        rope_theta=meta.f32("rope.freq_base", g.rope_base),
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"))
    scaling = get("rope.scaling.type", "none")
    factor = float(get("rope.scaling.factor", 1.0)) if scaling != "none" else 1.0
    if scaling not in ("none", "linear") or (factor != 1.0 and not spec.linear_rope_scaling):
        raise CheckpointError(f"{path}: metadata {g.arch}.rope.scaling.type={scaling!r} "
                              f"(factor {factor}) is not supported for {g.arch}")
    kw["rope_scaling_factor"] = factor
    kw.update(g.config(meta, kw))
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: metadata describes no valid model: {e}") from None
