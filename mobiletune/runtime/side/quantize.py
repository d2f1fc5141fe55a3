"""What crosses the link: hidden states (B, T, D) at a chosen precision, numpy only.

``int8``: symmetric per token, scale = absmax / 127 (float32), q = round-half-even(x / scale)
clipped to ±127. ``int4``: the same with ±7 and two values per byte (low nibble first).
``fp16``: a cast; ``fp32``: as is. Per token, because LLM activations differ by orders of
magnitude between tokens (a few "massive" channels on the first tokens), so one scale per
tensor wastes its range on them; per channel would need a calibration pass. The error of a
dequantized element is at most half a quantization step (scale / 2) for the integer kinds.
``pool`` is the phone's fixed, gradient-free narrowing for ``width="pooled"``.
"""

from __future__ import annotations

import numpy as np

LEVELS = {"int8": 127, "int4": 7}


def pool(h: np.ndarray, r: int) -> np.ndarray:
    """(..., D) -> (..., D // r): the mean of each group of r consecutive channels."""
    return h.reshape(*h.shape[:-1], h.shape[-1] // r, r).mean(-1, dtype=np.float32)


def quantize(h: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    """The tensors that carry ``h`` (float32 (..., D)) at ``precision``."""
    h = np.asarray(h, np.float32)
    if precision == "fp32":
        return {"x": h}
    if precision == "fp16":
        return {"x": h.astype(np.float16)}
    levels = LEVELS[precision]
    scale = np.abs(h).max(-1, keepdims=True) / np.float32(levels)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(h / scale), -levels, levels).astype(np.int8)
    if precision == "int4":
        if q.shape[-1] % 2:
            q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.int8)], -1)
        u = (q & 0x0F).astype(np.uint8)
        q = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    return {"q": q, "scale": scale[..., 0]}


def dequantize(parts: dict[str, np.ndarray], precision: str, width: int) -> np.ndarray:
    """float32 (..., width) back from ``quantize``'s tensors."""
    if precision in ("fp32", "fp16"):
        return np.asarray(parts["x"], np.float32)
    q = parts["q"]
    if precision == "int4":
        lo = (q & 0x0F).astype(np.int8)
        hi = (q >> 4).astype(np.int8)
        lo = np.where(lo > 7, lo - 16, lo)
        hi = np.where(hi > 7, hi - 16, hi)
        q = np.stack([lo, hi], -1).reshape(*q.shape[:-1], -1)[..., :width]
    return q.astype(np.float32) * parts["scale"][..., None]


def payload_bytes(shape, precision: str) -> int:
    """Bytes on the link for a float32 tensor of ``shape`` (..., D) at ``precision``."""
    n_tok, d = int(np.prod(shape[:-1])), int(shape[-1])
    per = {"fp32": 4 * d, "fp16": 2 * d, "int8": d + 4, "int4": (d + 1) // 2 + 4}[precision]
    return n_tok * per
