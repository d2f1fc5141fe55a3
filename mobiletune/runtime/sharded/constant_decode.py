"""One layer's decode program with its weights as constants (bundle schema 6).

The bundle holds, per block kind, ``decode_<kind>.skel``: ``block_decode_<kind>`` converted
with the block's base weights as constants, their bytes cut out
(``export/constant_decode.py``). ``write_program`` puts a layer's weights back at the
offsets the manifest records (``ShardedLayout.decode_consts``), into a file that LiteRT
memory-maps; XNNPACK packs the constants once when the interpreter first runs, and then
runs each one-row product at memory speed (~20 GB/s here, against ~9 GB/s for weights that
are inputs). ``drop_mapped_pages`` then hands the file's mapped pages back (the packed copy
is what runs), so the layer is resident once, not twice. The files are unlinked once open,
but their blocks stay allocated while the decoder lives (LiteRT keeps each mapped): about
the layers' float32 weights in the temporary directory (``TMPDIR``; on a phone's Termux, the
app's storage; where ``/tmp`` is a tmpfs that is RAM, so point ``TMPDIR`` at a disk).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np

from mobiletune.runtime.bundle import BundleError

_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def write_program(skeleton: bytes, regions, weights: dict, path: Path) -> None:
    """Skeleton + ``weights`` (input name -> array) into ``path``, each region's weight (or
    its transpose) as float32 at its offset. Every weight is checked before a byte is
    written."""
    arrays, cut = [], 0
    for r in regions:
        if r.offset - cut > len(skeleton):
            raise BundleError(f"{path.name}: the skeleton ends before weight {r.name!r} "
                              f"(offset {r.offset}); skeleton and manifest do not match")
        cut += r.nbytes
        w = weights.get(r.name)
        if w is None:
            raise BundleError(f"{path.name}: the decode program needs weight {r.name!r}, "
                              f"which the layer does not have")
        a = np.ascontiguousarray(w.T if r.transposed else w, np.float32)
        if a.nbytes != r.nbytes:
            raise BundleError(f"{path.name}: weight {r.name!r} {tuple(w.shape)} has "
                              f"{a.nbytes} bytes; the decode program holds {r.nbytes}")
        arrays.append(a)
    view = memoryview(skeleton)
    at = pos = 0
    with open(path, "wb") as f:
        for r, a in zip(regions, arrays):
            n = r.offset - pos
            f.write(view[at:at + n])
            f.write(a.data)
            at, pos = at + n, r.offset + r.nbytes
        f.write(view[at:])


def drop_mapped_pages(path: Path) -> int:
    """``madvise(MADV_DONTNEED)`` over every mapping of ``path`` in this process (LiteRT's
    read-only, private map of a program file): the pages leave the resident set, and a later
    touch reads them back from the file (which an open mapping keeps, even unlinked).
    Returns the bytes advised; 0 where there is no ``/proc/self/maps`` (not Linux)."""
    want = {str(path), f"{path} (deleted)"}
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5] in want:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((lo, hi - lo))
    except OSError:
        return 0
    if not spans:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for lo, n in spans:
        if libc.madvise(lo, n, _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), f"madvise of {path}: {os.strerror(ctypes.get_errno())}")
    return sum(n for _, n in spans)
