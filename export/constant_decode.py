"""A block's one-token decode program with its weights as constants, cut into a skeleton.

LiteRT runs a one-row product against constant weights through XNNPACK, which packs them
once, at ~20 GB/s here; against weights that are inputs (``block_decode_*`` in the program,
pinned per layer) it runs the built-in kernel at ~9 GB/s (benchmarks/README.md, "Decoding
over constant weights"). Decoding reads every weight once a token, so that is its speed.

The program is the same ``block_decode`` function, traced with each base product's weight
(every 2-D weight of the block but the LoRA factors) closed over as a constant, drawn at
random so that no two are alike. After conversion each one must be found verbatim in the
flatbuffer, as itself or transposed (FULLY_CONNECTED stores (out, in)): that proves the
converter did not fold it into anything else, so any layer's weights can take its place.
Those byte ranges are cut out; the rest (22 KB for SmolLM2-135M) is the bundle's
``decode_<kind>.skel`` and the ranges are ``ShardedLayout.decode_consts[kind]``
(``bundle.ConstRegion``). The phone writes skeleton + a layer's weights into a file per layer
(``runtime/sharded/constant_decode.py``) and opens an interpreter on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.common import ExportError
from mobiletune.runtime import bundle as B


def skeleton(fn, specs, name: str, seed: int = 0) -> tuple[bytes, tuple, list]:
    """(skeleton bytes, regions, the inputs left) for signature ``name`` = ``fn`` over
    ``specs`` with ``bundle.decode_constant_names(specs)`` closed over as constants."""
    from export.tflite import build_pure_module, convert
    rng = np.random.default_rng(seed)
    names = B.decode_constant_names(specs)
    consts = {s.name: rng.standard_normal(s.shape).astype(np.float32)
              for s in specs if s.name in names}
    rest = [s for s in specs if s.name not in consts]
    module, sigs = build_pure_module({name: (lambda kw: fn({**kw, **consts}), rest)})
    flat, _ = convert(module, sigs)
    regions = []
    for n, w in consts.items():
        found = []                                  # (offset, transposed) of every copy
        for b, t in ((w.tobytes(), False), (w.T.tobytes(), True)):
            at = flat.find(b)
            while at >= 0:
                found.append((at, t))
                at = flat.find(b, at + 1)
        if len(found) != 1:
            raise ExportError(f"{name}: weight {n!r} {w.shape} is not stored once, verbatim, "
                              f"in the converted decode program (found {len(found)} copies); "
                              f"it cannot take another layer's weights")
        regions.append(B.ConstRegion(n, found[0][0], w.nbytes, found[0][1]))
    regions.sort(key=lambda r: r.offset)
    for a, b in zip(regions, regions[1:]):
        if a.offset + a.nbytes > b.offset:
            raise ExportError(f"{name}: weights {a.name!r} and {b.name!r} overlap in the program")
    parts, at = [], 0
    for r in regions:
        parts.append(flat[at:r.offset])
        at = r.offset + r.nbytes
    parts.append(flat[at:])
    return b"".join(parts), tuple(regions), rest


def write_skeletons(table: dict, kinds, tmp: Path, files: dict) -> tuple[dict, int]:
    """Each kind's ``decode_<kind>.skel`` (from ``block_decode_<kind>`` in ``table``) into
    ``tmp`` and ``files``; returns (kind -> regions, the skeletons' bytes)."""
    consts, nbytes = {}, 0
    for kind in kinds:
        name, role = B.block_decode_sig(kind), B.decode_skeleton_role(kind)
        skel, consts[kind], _ = skeleton(*table[name], name)
        (tmp / (role + ".skel")).write_bytes(skel)
        files[role] = B.file_entry(tmp, role + ".skel")
        nbytes += len(skel)
    return consts, nbytes
