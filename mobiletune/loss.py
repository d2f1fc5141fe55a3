"""Next-token cross-entropy that never holds the whole (B, T, V) logits.

Vocabularies are large (Gemma 3: 262,144; Qwen: 151,936): for B=8, T=64 the full fp32
logits alone are 537 MB, and autodiff keeps them plus their softmax for the backward
pass. We split T into chunks, compute each chunk's logits, log-sum-exp and target logit
under ``jax.checkpoint`` (so the backward recomputes a chunk instead of storing it), and
sum. Peak extra memory is about B * chunk * V floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mobiletune import models


def _chunk_nll(h, w, tgt, mask, softcap):
    logits = jnp.einsum("bcd,vd->bcv", h, w)                         # (B, C, V)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    lse = jax.nn.logsumexp(logits, axis=-1)                           # (B, C)
    # the target logit through a one-hot product, not a gather: its gradient is then
    # elementwise, where a gather's is a scatter-add (which LiteRT handles poorly)
    picked = (logits * jax.nn.one_hot(tgt, logits.shape[-1], dtype=logits.dtype)).sum(-1)
    return ((lse - picked) * mask).sum()


def nll_sum(h, w, targets, mask, softcap=None, chunk: int = 64):
    """Summed NLL over masked-in positions.

    h: (B, T, D) final hidden; w: (V, D) output weights; targets: (B, T) int32;
    mask: (B, T) float32 (1 = counted). Returns a float32 scalar.
    """
    b, t, d = h.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    hs = h.reshape(b, n, chunk, d).swapaxes(0, 1)                     # (N, B, C, D)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)                  # (N, B, C)
    ms = mask.reshape(b, n, chunk).swapaxes(0, 1)
    f = jax.checkpoint(lambda hh, tt, mm: _chunk_nll(hh, w, tt, mm, softcap))
    if n == 1:
        return f(hs[0], ts[0], ms[0])

    def body(acc, xs):
        return acc + f(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total


def batch_nll(params, cfg, batch, lora=None, chunk: int = 64):
    """(summed NLL, number of counted tokens) of a batch dict with ``inputs``, ``targets``,
    ``loss_mask`` (all (B, T))."""
    h, _ = models.hidden_states(params, cfg, batch["inputs"], lora=lora)
    w = models.family(cfg).output_weight(params, cfg)
    mask = batch["loss_mask"].astype(jnp.float32)
    return nll_sum(h, w, batch["targets"], mask, cfg.final_logit_softcapping, chunk), mask.sum()
