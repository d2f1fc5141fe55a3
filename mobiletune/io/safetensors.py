"""Read and write safetensors files with numpy alone (the phone has no ``safetensors``
package, no torch).

Format: 8-byte little-endian header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw little-endian tensor bytes. Reads are memory-mapped; writes are atomic
(``mobiletune.io.atomic``). Every error names the file and, where it applies, the key.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.io.atomic import atomic_writer

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsError(MobiletuneError, ValueError):
    """A safetensors file that is truncated, malformed, or lacks what was asked for."""


def _bf16():
    import ml_dtypes  # desktop only; the phone never meets bf16 files
    return np.dtype(ml_dtypes.bfloat16)


def read_header(path: str | Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, byte offset of the data section)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SafetensorsError(f"{path}: truncated safetensors header "
                                       f"(says {n} bytes, file has {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsError(f"{path}: not a safetensors file (bad header)") from None
    meta = header.pop("__metadata__", {}) or {}
    data_start = 8 + n
    for name, e in header.items():
        end = e["data_offsets"][1]
        if data_start + end > size:
            raise SafetensorsError(f"{path}: truncated: tensor {name!r} ends at byte "
                                   f"{data_start + end}, file has {size}")
    return header, meta, data_start


def load(path: str | Path, names=None, mmap: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy arrays (memory-mapped, read-only, unless
    ``mmap=False``). ``names`` restricts to those keys; a missing one is an error."""
    path = Path(path)
    header, _, start = read_header(path)
    wanted = list(header) if names is None else list(names)
    missing = [n for n in wanted if n not in header]
    if missing:
        raise SafetensorsError(f"{path}: missing tensor(s) {missing[:5]}")
    raw = np.memmap(path, dtype=np.uint8, mode="r") if mmap else np.fromfile(path, np.uint8)
    out = {}
    for name in wanted:
        e = header[name]
        dt = _bf16() if e["dtype"] == "BF16" else DTYPES.get(e["dtype"])
        if dt is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        b, en = e["data_offsets"]
        arr = raw[start + b:start + en].view(dt)
        shape = tuple(e["shape"])
        if arr.size != int(np.prod(shape)):
            raise SafetensorsError(f"{path}: tensor {name!r}: {en - b} bytes do not hold "
                                   f"shape {shape} of {e['dtype']}")
        out[name] = arr.reshape(shape)
    return out


def shapes(path: str | Path) -> dict[str, tuple[tuple, np.dtype]]:
    """name -> (shape, dtype) of a safetensors file's tensors, from its header alone."""
    header, _, _ = read_header(path)
    out = {}
    for name, e in header.items():
        dt = DTYPES.get(e["dtype"])
        if dt is None:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        shape = tuple(e["shape"])
        b, en = e["data_offsets"]
        if en - b != int(np.prod(shape)) * np.dtype(dt).itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r}: {en - b} bytes do not hold "
                                   f"shape {shape} of {e['dtype']}")
        out[name] = (shape, np.dtype(dt))
    return out


def read_into(path: str | Path, out: dict[str, np.ndarray], after=None) -> None:
    """Read tensors of a safetensors file straight into the C-contiguous arrays ``out``
    (name -> array of the file's dtype and shape), one at a time, calling ``after(array)``
    once each is filled: no copy of the file is held."""
    path = Path(path)
    header, _, start = read_header(path)
    with open(path, "rb") as f:
        for name, a in out.items():
            e = header.get(name)
            if e is None:
                raise SafetensorsError(f"{path}: missing tensor {name!r}")
            b, en = e["data_offsets"]
            if (e["dtype"] != _NAMES.get(a.dtype) or tuple(e["shape"]) != a.shape
                    or en - b != a.nbytes):
                raise SafetensorsError(f"{path}: tensor {name!r} is {e['dtype']}{e['shape']}, "
                                       f"expected {a.dtype}{list(a.shape)}")
            f.seek(start + b)
            if a.nbytes and f.readinto(memoryview(a.reshape(-1)).cast("B")) != a.nbytes:
                raise SafetensorsError(f"{path}: truncated in tensor {name!r}")
            if after is not None:
                after(a)


def _encode(tensors: dict, meta: dict | None, dtype, source) -> tuple[bytes, list]:
    """(length-prefixed JSON header, the arrays in data order) of a safetensors file."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")  # (ascontiguousarray would make 0-d 1-d)
        if dtype is not None and a.dtype != np.dtype(dtype):
            a = _Cast(a, np.dtype(dtype))
        dt = "BF16" if a.dtype.name == "bfloat16" else _NAMES.get(a.dtype)
        if dt is None:
            raise SafetensorsError(f"{source}: tensor {name!r} has unsupported dtype {a.dtype}")
        header[name] = {"dtype": dt, "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if meta:
        header["__metadata__"] = {str(k): str(v) for k, v in meta.items()}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(blob)) + blob, arrays


def _write(f, head: bytes, arrays: list, after=None) -> None:
    f.write(head)
    for a in arrays:
        src = a
        if isinstance(a, _Cast):
            src, a = a.src, a.src.astype(a.dtype)
        f.write(a.tobytes(order="C") if a.ndim == 0 else memoryview(a.reshape(-1)).cast("B"))
        if after is not None:
            after(src)


def save(path: str | Path, tensors: dict[str, np.ndarray], meta: dict | None = None,
         dtype=None, after=None) -> None:
    """Write tensors atomically: a crash leaves either the old file or the new one.
    ``dtype`` casts every tensor as it is written (one tensor's copy at a time);
    ``after(array)`` is called once each tensor is written (a streamed state drops its
    pages)."""
    head, arrays = _encode(tensors, meta, dtype, Path(path))
    with atomic_writer(path) as f:
        _write(f, head, arrays, after)


def dumps(tensors: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (a network payload)."""
    buf = io.BytesIO()
    _write(buf, *_encode(tensors, meta, None, "payload"))
    return buf.getvalue()


def loads(data: bytes, source: str = "payload") -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, __metadata__) of safetensors bytes from anyone: every entry is checked
    (dtype, shape, offsets inside the data, sizes that match) and every error is a
    ``SafetensorsError`` naming ``source`` and the key. The arrays are copies."""
    if len(data) < 8:
        raise SafetensorsError(f"{source}: {len(data)} bytes, not a safetensors payload")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise SafetensorsError(f"{source}: header of {n} bytes, payload has {len(data) - 8}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SafetensorsError(f"{source}: not a safetensors payload (bad header)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{source}: the header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(f"{source}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n:]
    out = {}
    for name, e in header.items():
        try:
            dt = np.dtype(DTYPES[e["dtype"]])
            shape = tuple(e["shape"])
            b, en = e["data_offsets"]
            ok = (all(type(x) is int and x >= 0 for x in (*shape, b, en)) and b <= en <= len(body)
                  and en - b == int(np.prod(shape)) * dt.itemsize)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SafetensorsError(f"{source}: tensor {name!r}: bad entry {str(e)[:120]}")
        out[name] = np.frombuffer(body[b:en], dt).reshape(shape).copy()
    return out, meta


class _Cast:
    """A tensor to be cast when written: shape and dtype for the header, no copy yet."""

    def __init__(self, src: np.ndarray, dtype: np.dtype):
        self.src, self.dtype, self.shape, self.ndim = src, dtype, src.shape, src.ndim
        self.nbytes = src.size * dtype.itemsize
