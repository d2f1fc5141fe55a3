"""The sharded bundle's frozen weights: ``WeightStore`` reads one safetensors file,
memory-mapped, a tensor (or a block of rows) at a time, widened to float32 (float16 cast;
int8 times its per-channel scales, see ``int8.py``); pages are handed
back to the kernel (``MADV_DONTNEED``) once a tensor has been copied, so a resident mapped
page — which counts in RSS — does not outlive its use. ``LayerCache`` keeps widened weights
between the passes when a memory budget allows."""

from __future__ import annotations

import collections
import mmap
import os
from pathlib import Path

import numpy as np

from mobiletune.io import safetensors as st
from mobiletune.runtime.bundle import BundleError
from mobiletune.runtime.sharded.int8 import scale_name

_PAGE = mmap.PAGESIZE


class WeightStore:
    def __init__(self, path):
        self.path = Path(path)
        try:
            header, _, start = st.read_header(self.path)
        except st.SafetensorsError as e:
            raise BundleError(str(e)) from None
        self.entries = {}
        for name, e in header.items():
            dt = st.DTYPES.get(e["dtype"])
            if dt not in (np.float32, np.float16, np.int8):
                raise BundleError(f"{self.path}: tensor {name!r} is {e['dtype']}; the weight "
                                  f"store holds F32, F16 or I8")
            b, en = e["data_offsets"]
            shape = tuple(e["shape"])
            if en - b != int(np.prod(shape)) * np.dtype(dt).itemsize:
                raise BundleError(f"{self.path}: tensor {name!r}: {en - b} bytes do not hold "
                                  f"shape {shape} of {e['dtype']}")
            self.entries[name] = (np.dtype(dt), shape, start + b)
        self._f = open(self.path, "rb")
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pending: list[tuple[int, int]] = []   # views out: (offset, bytes) to release
        self.scales = {}  # int8 tensor name -> float32 scales, (rows, 1) or (1, cols)
        for name, (dt, shape, _) in list(self.entries.items()):
            if dt == np.int8:
                self.scales[name] = self._scales(name, shape)

    def _scales(self, name, shape) -> np.ndarray:
        """The float32 scales stored beside int8 tensor ``name`` (read once, then dropped
        from the entries: they are not weights)."""
        key = scale_name(name)
        dt, sshape, _ = self.entries.get(key, (None, None, None))
        want = ((shape[0], 1), (1, shape[1])) if len(shape) == 2 else ()
        if dt != np.float32 or sshape not in want:
            raise BundleError(f"{self.path}: int8 tensor {name!r} {shape} needs float32 scales "
                              f"{key!r} of shape {' or '.join(map(str, want)) or '(2-D only)'}; "
                              f"found {'none' if dt is None else f'{dt} {sshape}'}")
        a, b0, nb = self._view(key)
        out = a.copy()
        self.release(b0, nb)
        del self.entries[key]
        return out

    def __contains__(self, name) -> bool:
        return name in self.entries

    def shape(self, name) -> tuple:
        return self._entry(name)[1]

    def _entry(self, name):
        if name not in self.entries:
            raise BundleError(f"{self.path}: no tensor {name!r} in the weight store")
        return self.entries[name]

    def _view(self, name, r0=0, r1=None) -> tuple[np.ndarray, int, int]:
        dt, shape, off = self._entry(name)
        row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        r1 = shape[0] if r1 is None else r1
        b0 = off + r0 * row * dt.itemsize
        n = (r1 - r0) * row
        a = np.frombuffer(self._mm, dt, count=n, offset=b0)
        return a.reshape((r1 - r0, *shape[1:]) if shape else ()), b0, n * dt.itemsize

    def release_pending(self) -> None:
        """Hand back the pages of every view ``get(copy=False)`` gave out (the views stay
        valid: touching them again reads the pages back in)."""
        for b0, nb in self._pending:
            self.release(b0, nb)
        self._pending.clear()

    def release(self, b0: int, nbytes: int) -> None:
        lo = b0 // _PAGE * _PAGE
        hi = -(-(b0 + nbytes) // _PAGE) * _PAGE
        self._mm.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(self._mm)) - lo)

    def get(self, name, r0: int = 0, r1: int | None = None, out=None,
            copy: bool = True) -> np.ndarray:
        """A float32 copy of a tensor (or rows r0:r1 of it); its pages are released.
        ``copy=False``: a float32 tensor comes back as a read-only view of the mapping (no
        copy: LiteRT copies its inputs anyway), its pages released by ``release_pending``
        once the caller has used it; other dtypes are widened into a copy as before."""
        a, b0, nb = self._view(name, r0, r1)
        if not copy and out is None and a.dtype == np.float32 and name not in self.scales:
            self._pending.append((b0, nb))
            return a
        if out is None:
            res = a.astype(np.float32)
        else:
            out[: len(a)] = a
            res = out
        if name in self.scales:
            s = self.scales[name]
            res[: len(a)] *= s[r0: r0 + len(a)] if s.shape[0] > 1 else s
        self.release(b0, nb)
        return res

    def gather_rows(self, name, ids) -> np.ndarray:
        """rows[ids] as float32 (an embedding lookup), read with ``pread``: touching rows
        through the mapping would map whole fault-around windows (64 KB per row here) into
        this process, which for scattered rows costs far more RSS than the rows themselves."""
        dt, shape, off = self._entry(name)
        ids = np.asarray(ids)
        uniq, inv = np.unique(ids.reshape(-1), return_inverse=True)
        row = int(np.prod(shape[1:]))
        rows = np.empty((len(uniq), row), dt)
        for j, i in enumerate(uniq):
            if not 0 <= i < shape[0]:
                raise BundleError(f"{self.path}: row {int(i)} of {name!r} is out of range "
                                  f"(it has {shape[0]} rows)")
            os.preadv(self._f.fileno(), [rows[j]], off + int(i) * row * dt.itemsize)
        rows = rows.astype(np.float32, copy=False)
        if name in self.scales:
            s = self.scales[name]
            rows *= s[uniq] if s.shape[0] > 1 else s
        return rows[inv].reshape(*ids.shape, *shape[1:])


class LayerCache:
    """Frozen weights widened to float32, kept between a layer's forward and backward pass
    as far as a memory budget allows (least recently used first out). Without a budget
    nothing is kept; with one, the room left after the first micro-batch (which measured
    what a step needs) becomes the cache's capacity."""

    def __init__(self, store: WeightStore, budget_mb: float | None):
        self.store, self.budget = store, budget_mb
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cap = 0 if budget_mb is None else None   # None: set after the first micro-batch
        self._bytes = 0

    def get(self, name: str) -> np.ndarray:
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
            return hit
        if not self._cap:   # nothing kept: a view of the mapping, no copy (float32 stores)
            return self.store.get(name, copy=False)
        a = self.store.get(name)
        self._cache[name] = a
        self._bytes += a.nbytes
        while self._bytes > self._cap and self._cache:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.nbytes
        return a

    @property
    def capacity(self) -> int:
        """Bytes it may keep (0 until the first micro-batch has measured the room)."""
        return self._cap or 0

    @property
    def bytes(self) -> int:
        """Bytes of widened weights held now."""
        return self._bytes

    def set_capacity(self, nbytes: int) -> None:
        """Called after the first micro-batch with the budget's headroom left for weights."""
        self._cap = max(0, int(nbytes))
