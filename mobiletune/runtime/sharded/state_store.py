"""Where a sharded bundle's trainable state lives: in RAM, or streamed through a
memory-mapped file (a full fine-tune's parameters, gradients and optimizer moments are 4×
the model; SmolLM2-135M's are 2.2 GB).

The streamed store is one file, ``<run>/state-store.bin``, every vector at a page-aligned
offset, mapped shared. The file is unlinked as soon as it is mapped: the kernel frees it
when the process ends, even on ``kill -9``, so no stale copy of the state is ever left
behind. Training touches the store one shard at a time (a layer's tensors in the passes, a
chunk of a group in the optimizer) and then ``release``s those pages with
``madvise(MADV_DONTNEED)``: on a shared file mapping that drops them from the process's
resident set and keeps their contents in the page cache (dirty pages are written back by
the kernel), so the next touch is a minor fault, not a disk read. Resident: the shard in
use; the page cache is the kernel's to reclaim.

The store is a working area, not a checkpoint: it is rebuilt from the bundle's state or a
checkpoint at every start, and checkpoints are written from it tensor by tensor
(``state_checkpoints``), so their atomicity and exact resume are the in-RAM path's.

Which one (``choose``): ``ram`` or ``disk`` when asked; else, with ``--memory-budget-mb``,
the disk store when the state needs more than half the budget; without a budget, when it
needs more than ``STREAM_ABOVE_MB``. LoRA states (a few MB) stay in RAM.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError

STORES = ("auto", "ram", "disk")
STREAM_ABOVE_MB = 256
FILE = "state-store.bin"
_PAGE = mmap.PAGESIZE


def choose(state_bytes: int, store: str = "auto", memory_budget_mb: float | None = None,
           directory=None) -> bool:
    """True when the state is streamed from a file under ``directory`` (the rule above)."""
    if store not in STORES:
        raise MobiletuneError(f"--state-store {store!r}: expected one of {', '.join(STORES)}")
    if store == "auto":
        limit = STREAM_ABOVE_MB if memory_budget_mb is None else memory_budget_mb / 2
        disk = state_bytes > limit * 2**20
    else:
        disk = store == "disk"
    if disk and directory is None:
        if store == "disk":
            raise MobiletuneError("--state-store disk needs a run directory (--out) for its file")
        return False
    return disk


def _rounded(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


def nbytes(requests) -> int:
    """Bytes a file store needs for ``requests``: [(shape, dtype), ...], page-aligned."""
    return sum(_rounded(max(int(np.prod(s)) * np.dtype(d).itemsize, 1)) for s, d in requests)


class RamStore:
    """Plain arrays; ``release`` has nothing to drop."""

    streamed = False

    def alloc(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def release(self, *arrays) -> None:
        pass


class FileStore:
    """Arrays carved out of one shared file mapping (see the module docstring)."""

    streamed = True

    def __init__(self, directory, total: int):
        self.path = Path(directory) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        total = max(total, _PAGE)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:  # reserve the blocks now: a full disk is this error, not a SIGBUS later
                os.posix_fallocate(fd, 0, total)
            except (AttributeError, OSError) as e:  # not Linux, or a file system without it
                if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, total)
            self.mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise MobiletuneError(f"{self.path}: cannot make the {total / 2**20:.0f} MB state "
                                  f"store: {e.strerror or e}") from None
        finally:
            os.close(fd)
            self.path.unlink(missing_ok=True)
        self.total, self.used = total, 0
        self.base = np.frombuffer(self.mm, np.uint8)
        self.addr = self.base.__array_interface__["data"][0]

    def alloc(self, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.used + n > self.total:
            raise ValueError(f"state store of {self.total} bytes is full")  # a layout bug
        a = self.base[self.used:self.used + n].view(dtype).reshape(shape)
        self.used += _rounded(max(n, 1))
        return a

    def release(self, *arrays) -> None:
        """Drop the pages under ``arrays`` (contiguous views into this store) from the
        resident set; their contents stay (page cache, then the file)."""
        for a in arrays:
            if a.size == 0:
                continue
            start = a.__array_interface__["data"][0] - self.addr
            end = start + a.size * a.itemsize
            if not 0 <= start < end <= self.total:
                continue  # not the store's (the step counters, a copy)
            start -= start % _PAGE
            self.mm.madvise(mmap.MADV_DONTNEED, start, min(_rounded(end), self.total) - start)
