"""The optimizer step of a sharded bundle: the accumulated gradients are divided by the
token count, clipped by their global norm (a host reduction over every group, as
``optax.clip_by_global_norm``), and each group's flat vector goes through its ``opt_*``
signature (the recipe's optax optimizer, elementwise) in fixed-size chunks. A streamed
state (``state_store``) releases each group after each pass and each chunk after its call,
so only one chunk of the vectors is resident."""

from __future__ import annotations

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.sharded.host_state import GroupState, HostState


def apply(state: HostState, calls) -> tuple[float, int]:
    """One optimizer step; returns (mean loss of the effective batch, steps taken). Two
    passes over the gradients: the mean (and its squared norm, when clipping), then the
    chunks (clipped, updated, zeroed)."""
    lay = state.manifest.sharded
    denom = np.float32(max(float(state.acc_count), 1.0))
    release = state.store.release
    sq = []
    for g in state.groups:
        g.acc /= denom
        if lay.clip_norm is not None:
            sq.append(float(np.dot(g.acc, g.acc)))
        release(g.acc)
    clip = None
    if lay.clip_norm is not None:
        norm = np.float32(np.sqrt(sum(sq)))
        if not norm < lay.clip_norm:  # optax.clip_by_global_norm: t / norm * max_norm
            clip = (norm, np.float32(lay.clip_norm))
    for g in state.groups:
        _group(g, lay.opt_chunk, calls, clip, release)
    loss = float(state.acc_nll / denom)
    state.step[...] += 1
    state.acc_nll[...] = 0
    state.acc_count[...] = 0
    return loss, int(state.step)


def _group(g: GroupState, c: int, calls, clip, release) -> None:
    """The group's vector chunk by chunk (its gradients clipped by ``clip`` = (norm,
    max_norm) first, and zeroed once used); the scalar leaves (optax's ``count``) go in
    unchanged for every chunk and are taken from the first chunk's outputs."""
    vec = {n for n, a in g.opt.items() if a.ndim == 1}
    scalars = {n: a.copy() for n, a in g.opt.items() if n not in vec}
    new_scalars = None
    pad = np.zeros(c, np.float32)
    for o in range(0, g.size, c):
        n = min(c, g.size - o)
        if clip is not None:
            g.acc[o:o + n] /= clip[0]
            g.acc[o:o + n] *= clip[1]

        def chunk(a):
            if n == c:
                return a[o:o + c]
            buf = pad.copy()
            buf[:n] = a[o:o + n]
            return buf
        ins = {"p": chunk(g.p), "g": chunk(g.acc)}
        ins.update({B.S + name: chunk(g.opt[name]) for name in vec})
        ins.update({B.S + name: v for name, v in scalars.items()})
        out = calls(B.opt_sig(g.group.optimizer), ins)
        g.p[o:o + n] = out["p"][:n]
        for name in vec:
            g.opt[name][o:o + n] = out[B.S + name][:n]
        g.acc[o:o + n] = 0
        release(*(a[o:o + n] for a in (g.p, g.acc, *(g.opt[name] for name in vec))))
        if new_scalars is None:
            new_scalars = {name: out[B.S + name] for name in scalars}
    for name, v in (new_scalars or {}).items():
        g.opt[name][...] = np.asarray(v).reshape(g.opt[name].shape)
