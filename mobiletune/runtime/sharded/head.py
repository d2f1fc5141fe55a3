"""The head for one vocabulary chunk on the host (numpy): what the bundle's ``head_fwd``
and ``head_wgrad`` signatures return (``programs.sharded.ShardedModel.head_fwd`` /
``head_wgrad``), computed with numpy's BLAS instead of LiteRT.

Why: the head is the largest product of a step (GPT-2: 768 × 50,257; Gemma 3 270M:
640 × 262,144, half of its LoRA step), and on the x86 machines measured numpy's sgemm ran it
at ~1.4× LiteRT's BATCH_MATMUL (benchmarks/README.md, "where the time goes"). The chunking,
the online merge across chunks and the gradient through the head stay in ``chain``.
Opt-in: ``ShardedRunner(head="host")`` (``device train --head host``); the default is the
signature. Call it from the main thread: OpenBLAS's threaded sgemm spun forever in
``exec_blas`` when a Flower simulation's server thread ran it (CI, 2026-12-03).
"""

from __future__ import annotations

import numpy as np


def _logits(x: np.ndarray, w: np.ndarray, softcap: float | None):
    """(BT, n) logits of ``x`` (BT, D) by the chunk's rows ``w`` (n, D), soft-capped, and the
    soft-cap's derivative 1 - tanh²(z / c) (None without soft-capping)."""
    z = x @ w.T
    g = None
    if softcap is not None:
        c = np.float32(softcap)
        np.tanh(z / c, out=z)
        g = 1.0 - z * z
        z *= c
    return z, g


def head_chunk(hn: np.ndarray, w: np.ndarray, labels: np.ndarray,
               softcap: float | None = None) -> dict[str, np.ndarray]:
    """One chunk of the head: ``hn`` (B, T, D) final-normed states, ``w`` (n, D) the chunk's
    rows of the head (only real rows: no padding), ``labels`` (B, T) target ids relative to
    the chunk (outside [0, n): another chunk's). Returns float32 ``lse`` (B, T) over the chunk,
    ``target_logit`` (B, T) (0 outside), ``u`` = (softmax_chunk ⊙ g) @ w (B, T, D) and, with
    soft-capping, ``target_g`` (B, T): g = 1 - tanh²(z / c) at the target (0 outside)."""
    b, t, d = hn.shape
    n = w.shape[0]
    z, g = _logits(hn.reshape(b * t, d), w, softcap)
    lab = labels.reshape(-1)
    inside = (lab >= 0) & (lab < n)
    rows = np.arange(b * t)
    at = np.clip(lab, 0, n - 1)
    target = np.where(inside, z[rows, at], np.float32(0))
    m = z.max(axis=1)
    z -= m[:, None]
    np.exp(z, out=z)                                      # unnormalized p: one pass less
    s = z.sum(axis=1)                                     # to normalize u (B·T·D) instead
    out = {"lse": (m + np.log(s)).reshape(b, t), "target_logit": target.reshape(b, t)}
    if g is not None:
        out["target_g"] = np.where(inside, g[rows, at], np.float32(0)).reshape(b, t)
        z *= g
    u = z @ w
    u /= s[:, None]
    out["u"] = u.reshape(b, t, d)
    return {k: v.astype(np.float32, copy=False) for k, v in out.items()}


def head_wgrad_chunk(hn: np.ndarray, w: np.ndarray, labels: np.ndarray, lse: np.ndarray,
                     mask: np.ndarray, softcap: float | None = None) -> np.ndarray:
    """The gradient of the summed NLL by one chunk's rows of a trained head: ``hn``, ``w``
    (n, D) and ``labels`` as for ``head_chunk``; ``lse`` (B, T) the log-sum-exp over the whole
    vocabulary and ``mask`` (B, T) the loss mask. Returns float32 (n, D) =
    ((softmax - onehot) ⊙ g)ᵀ @ (mask · hn), g the soft-cap's derivative (1 without)."""
    b, t, d = hn.shape
    n = w.shape[0]
    x = hn.reshape(b * t, d)
    z, g = _logits(x, w, softcap)
    z -= lse.reshape(-1, 1)
    np.exp(z, out=z)                                                           # softmax
    lab = labels.reshape(-1)
    rows = np.flatnonzero((lab >= 0) & (lab < n))
    z[rows, lab[rows]] -= 1
    if g is not None:
        z *= g
    xm = x * mask.reshape(-1, 1).astype(np.float32)                            # (BT, D)
    return (z.T @ xm).astype(np.float32, copy=False)
