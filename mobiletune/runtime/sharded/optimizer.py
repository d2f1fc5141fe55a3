"""The optimizer step of a sharded bundle: the accumulated gradients are divided by the
token count and clipped by their global norm (a host reduction over every group, as
``optax.clip_by_global_norm``; the two as one factor, applied chunk by chunk), and each
group's flat vector goes through its ``opt_*`` signature (the recipe's optax optimizer,
elementwise) in fixed-size chunks. A streamed state (``state_store``) releases each group
after each pass and each chunk after its call, so only one chunk of the vectors is
resident."""

from __future__ import annotations

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.sharded.host_state import GroupState, HostState


def apply(state: HostState, calls) -> tuple[float, int]:
    """One optimizer step; returns (mean loss of the effective batch, steps taken). At most
    two passes over the gradients: their squared norm (when clipping), then the chunks,
    each scaled once (the mean over the tokens times the clip factor), updated, zeroed."""
    lay = state.manifest.sharded
    count = np.float32(max(float(state.acc_count), 1.0))
    release = state.store.release
    scale = np.float32(1.0) / count
    if lay.clip_norm is not None:
        sq = 0.0
        for g in state.groups:
            sq += float(np.dot(g.acc, g.acc))
            release(g.acc)
        norm = np.float32(np.sqrt(sq)) / count                   # the mean's global norm
        if not norm < lay.clip_norm:  # optax.clip_by_global_norm's t / norm * max_norm
            scale = scale * (np.float32(lay.clip_norm) / norm)
    for g in state.groups:
        _group(g, lay.opt_chunk, calls, scale, release)
    loss = float(state.acc_nll / count)
    state.step[...] += 1
    state.acc_nll[...] = 0
    state.acc_count[...] = 0
    return loss, int(state.step)


def _group(g: GroupState, c: int, calls, scale: np.float32, release) -> None:
    """The group's vector chunk by chunk (its summed gradients times ``scale`` first, and
    zeroed once used); the scalar leaves (optax's ``count``) go in unchanged for every
    chunk and are taken from the first chunk's outputs."""
    vec = {n for n, a in g.opt.items() if a.ndim == 1}
    scalars = {n: a.copy() for n, a in g.opt.items() if n not in vec}
    new_scalars = None
    pad = np.zeros(c, np.float32)
    for o in range(0, g.size, c):
        n = min(c, g.size - o)
        g.acc[o:o + n] *= scale

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
