"""Int8 frozen weights for sharded bundles (opt-in: ``export --sharded --store-dtype int8``).

Every 2-D frozen weight is stored as int8 with one float32 scale per **output channel**,
symmetric: ``scale = max|w| / 127`` over the channel's inputs, ``q = round(w / scale)`` in
[-127, 127], so each weight is off by at most ``scale / 2``. The output channel is a row of
an HF ``Linear`` weight (out, in) and of an embedding (vocab, hidden: the tied head's output
rows), and a column of a GPT-2 ``Conv1D`` weight (in, out). The scales sit beside the tensor
in the store as ``<name>:scale`` with a broadcastable shape, (rows, 1) or (1, cols).
1-D tensors (norms, biases) stay float32. The phone widens a tensor to ``q * scale`` in
float32 when it loads it, so ``roundtrip`` gives exactly the weights it computes with (the
desktop uses it to measure what int8 storage costs in quality).
"""

from __future__ import annotations

import numpy as np

from mobiletune import families

SCALE = "{}:scale"


def scale_name(name: str) -> str:
    return SCALE.format(name)


def channel_axis(name: str, family: str) -> int:
    """The axis that indexes output channels of 2-D weight ``name``: 1 for Conv1D, else 0."""
    return 1 if families.spec(family).is_conv1d(name.rsplit(".", 1)[0]) else 0


def quantize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale) with ``scale`` keeping the reduced axis as size 1."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1 - axis, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def quantize_store(frozen: dict, family: str) -> dict:
    """The weight store's tensors for ``frozen``: int8 + scales for 2-D, float32 else."""
    out = {}
    for name, w in frozen.items():
        w = np.asarray(w)
        if w.ndim == 2:
            out[name], out[scale_name(name)] = quantize(w, channel_axis(name, family))
        else:
            out[name] = w.astype(np.float32)
    return out


def roundtrip(params: dict, family: str) -> dict:
    """``params`` with every 2-D tensor replaced by the float32 weights an int8 store gives
    back, exactly as the phone widens them."""
    out = dict(params)
    for name, w in params.items():
        w = np.asarray(w)
        if w.ndim == 2:
            q, s = quantize(w, channel_axis(name, family))
            out[name] = q.astype(np.float32) * s
    return out
