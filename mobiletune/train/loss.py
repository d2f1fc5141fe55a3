"""Next-token cross-entropy that never holds the whole (B, T, V) logits.

Vocabularies are large (Gemma 3: 262,144; Qwen: 151,936): for B=8, T=64 the full fp32
logits alone are 537 MB, and autodiff keeps them plus their softmax for the backward
pass. We split T into chunks and, for each, compute the logits, the NLL and — under
autodiff — the gradients w.r.t. the hidden states and (if trainable) the output weights
right away, while the chunk's logits exist (a custom VJP). The backward pass then only
scales the stored (B, T, D) gradient: no B·T·V tensor is kept, and no chunk's logits are
computed twice (as ``jax.checkpoint`` would). Peak extra memory: about B·chunk·V floats.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from mobiletune import models
from mobiletune.models.layers import matmul_t


def _logits(h, w, softcap, form):
    z = matmul_t(h, w, form)                                              # (B, C, V)
    if softcap is None:
        return z, None
    t = jnp.tanh(z / softcap)
    return t * softcap, t


def _chunk(h, w, tgt, mask, softcap, grads: bool, w_grad: bool, form: str):
    """Summed NLL of one chunk and, when asked, d(NLL)/dh (B, C, D) and d(NLL)/dW (V, D),
    computed while the chunk's logits exist (no second pass, nothing B·T·V kept)."""
    logits, t = _logits(h, w, softcap, form)
    lse = jax.nn.logsumexp(logits, axis=-1)                           # (B, C)
    # the target logit through a one-hot product, not a gather: its gradient is then
    # elementwise, where a gather's is a scatter-add (which LiteRT handles poorly)
    onehot = jax.nn.one_hot(tgt, logits.shape[-1], dtype=logits.dtype)
    nll = ((lse - (logits * onehot).sum(-1)) * mask).sum()
    if not grads:
        return nll, None, None
    dz = (jnp.exp(logits - lse[..., None]) - onehot) * mask[..., None]  # softmax - onehot
    if t is not None:
        dz = dz * (1.0 - t * t)                                       # through the soft-cap
    dh = jnp.einsum("bcv,vd->bcd", dz, w)
    dw = jnp.einsum("bcv,bcd->vd", dz, h) if w_grad else None
    return nll, dh, dw


def _split(h, targets, mask, chunk):
    b, t, d = h.shape
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    return (h.reshape(b, n, chunk, d).swapaxes(0, 1),                 # (N, B, C, D)
            targets.reshape(b, n, chunk).swapaxes(0, 1),              # (N, B, C)
            mask.reshape(b, n, chunk).swapaxes(0, 1)), pad


def _scan(h, w, targets, mask, softcap, chunk, grads, w_grad, form):
    (hs, ts, ms), pad = _split(h, targets, mask, chunk)
    dw0 = jnp.zeros_like(w) if (grads and w_grad) else jnp.zeros((), w.dtype)

    def body(carry, xs):
        nll, dw = carry
        c_nll, c_dh, c_dw = _chunk(*xs[:1], w, *xs[1:], softcap, grads, w_grad, form)
        return (nll + c_nll, dw + c_dw if c_dw is not None else dw), c_dh

    (nll, dw), dhs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), (hs, ts, ms))
    if not grads:
        return nll, None, None
    b, d = h.shape[0], h.shape[2]
    dh = dhs.swapaxes(0, 1).reshape(b, -1, d)[:, : h.shape[1]]       # (B, T, D)
    return nll, dh, (dw if w_grad else None)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def nll_sum(h, w, targets, mask, softcap=None, chunk: int = 64, w_grad: bool = True,
            form: str = "einsum"):
    """Summed NLL over masked-in positions.

    h: (B, T, D) final hidden; w: (V, D) output weights; targets: (B, T) int32;
    mask: (B, T) float32 (1 = counted). Returns a float32 scalar. Under autodiff the
    gradients are formed chunk by chunk in the forward pass (``w_grad=False`` skips the
    (V, D) weight gradient, e.g. for LoRA where the head is frozen). ``form``: how the
    logits' product is written (``models.layers.MATMUL_FORMS``).
    """
    return _scan(h, w, targets, mask, softcap, chunk, False, False, form)[0]


def _nll_fwd(h, w, targets, mask, softcap, chunk, w_grad, form):
    nll, dh, dw = _scan(h, w, targets, mask, softcap, chunk, True, w_grad, form)
    return nll, (dh, dw, w)


def _nll_bwd(softcap, chunk, w_grad, form, res, g):
    dh, dw, w = res
    return g * dh, (g * dw if w_grad else jnp.zeros_like(w)), None, None


nll_sum.defvjp(_nll_fwd, _nll_bwd)


def batch_nll(params, cfg, batch, lora=None, chunk: int = 64, head_trainable: bool = True):
    """(summed NLL, number of counted tokens) of a batch dict with ``inputs``, ``targets``,
    ``loss_mask`` (all (B, T)). ``head_trainable=False`` skips the output weight's gradient."""
    h, _ = models.hidden_states(params, cfg, batch["inputs"], lora=lora)
    w = models.family(cfg).output_weight(params, cfg)
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = nll_sum(h, w, batch["targets"], mask, cfg.final_logit_softcapping, chunk, head_trainable,
                  cfg.matmul)
    return nll, mask.sum()
