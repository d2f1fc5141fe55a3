"""The LoRA aggregation math (numpy only, no Flower): example-weighted means, FlexLoRA's
heterogeneous-rank aggregation and redistribution, FFA-LoRA's B-only mean.

FlexLoRA (Bai et al. 2024): client i trains rank r_i; the server forms
ΔW = Σ_i p_i · s_i · B_i A_i (p_i ∝ examples, s_i the LoRA scale at r_i) and gives client
j the best rank-r_j approximation, A = √Σ_r V_rᵀ, B = U_r √Σ_r / s_j. The dense out×in
ΔW is never formed: with P = [p_i s_i B_i] (out×R) and Q = [A_i] (R×in), R = Σ r_i,
ΔW = P Q = Q_p (R_p R_qᵀ) Q_qᵀ from two thin QRs, so its SVD is that of the R×R core.
"""

from __future__ import annotations

import numpy as np

from mobiletune.fed.adapter import A_SUFFIX, B_SUFFIX


def weighted_mean(adapters: list[dict], weights: list[float]) -> dict[str, np.ndarray]:
    """(Σ_i w_i · x_i) / Σw per key, accumulated in float64, rounded once to float32."""
    total = float(sum(weights))
    if not adapters or total <= 0:
        raise ValueError("weighted_mean: no updates with positive weight")
    out = {}
    for k in adapters[0]:
        acc = np.zeros(np.shape(adapters[0][k]), np.float64)
        for a, w in zip(adapters, weights):
            acc += float(w) * np.asarray(a[k], np.float64)
        out[k] = (acc / total).astype(np.float32)
    return out


def lowrank_svd(terms: list[tuple[float, np.ndarray, np.ndarray]]):
    """SVD (U, S, Vt) of Σ c·B@A over ``terms`` = [(c, B (out, r), A (r, in)), ...] without
    the dense product: two thin QRs and the SVD of the small Σr × Σr core (float64)."""
    p = np.concatenate([c * np.asarray(b, np.float64) for c, b, _ in terms], axis=1)  # (out, R)
    q = np.concatenate([np.asarray(a, np.float64) for _, _, a in terms], axis=0)      # (R, in)
    qp, rp = np.linalg.qr(p)                                                          # (out, R), (R, R)
    qq, rq = np.linalg.qr(q.T)                                                        # (in, R), (R, R)
    u, s, vt = np.linalg.svd(rp @ rq.T)                                               # core (R, R)
    return qp @ u, s, vt @ qq.T                                                       # (out,R),(R,),(R,in)


def factors_at_rank(svd, rank: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(A (rank, in), B (out, rank)) with scale·B@A the rank-``rank`` truncated SVD of the
    aggregate; zero rows/columns where the aggregate's rank is lower."""
    u, s, vt = svd
    k = min(rank, len(s))
    a = np.zeros((rank, vt.shape[1]), np.float64)
    b = np.zeros((u.shape[0], rank), np.float64)
    rs = np.sqrt(s[:k])
    a[:k] = rs[:, None] * vt[:k]
    b[:, :k] = u[:, :k] * rs[None, :] / scale
    return a.astype(np.float32), b.astype(np.float32)


def flexlora_aggregate(updates: list[dict], weights: list[float], scales: list[float],
                       keep: int) -> dict[str, tuple]:
    """module -> (U[:, :keep], S[:keep], Vt[:keep]) of Σ p_i s_i B_i A_i; ``updates`` are
    wire dicts (any ranks), ``scales`` each client's LoRA scale, ``keep`` the largest rank
    any client will ask for (truncating there first changes no client's answer)."""
    from mobiletune.fed.adapter import modules
    total = float(sum(weights))
    per = [modules(u) for u in updates]
    out = {}
    for m in per[0]:
        terms = [(w / total * s, mods[m][1], mods[m][0]) for mods, w, s in zip(per, weights, scales)]
        u, s, vt = lowrank_svd(terms)
        out[m] = (u[:, :keep], s[:keep], vt[:keep])
    return out


def flexlora_adapter(svds: dict[str, tuple], rank: int, scale: float) -> dict[str, np.ndarray]:
    """A wire adapter of rank ``rank`` (LoRA scale ``scale``) from ``flexlora_aggregate``."""
    out = {}
    for m, svd in svds.items():
        a, b = factors_at_rank(svd, rank, scale)
        out[m + A_SUFFIX], out[m + B_SUFFIX] = a, b
    return out


def b_only(wire: dict) -> dict:
    """FFA-LoRA's payload: the B factors (A stays frozen from the shared seed)."""
    return {k: v for k, v in wire.items() if k.endswith(B_SUFFIX)}
