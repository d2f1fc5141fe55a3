"""Pieces shared by the model families: norms, RoPE, attention with GQA / sliding window,
activations, and linear layers over Hugging Face weight layouts.

Shapes: B batch, T query positions, S key positions, D model width, H query heads,
K key/value heads, G = H // K query heads per key/value head, Dh head width.
All math is float32 (the dtype of the params); softmax is computed in float32.
"""

from __future__ import annotations

import zlib
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

NEG_INF = -1e30  # finite, so a fully-masked row gives a uniform softmax rather than NaN


# How products are written: "einsum" (XLA's choice of kernel; the desktop) or
# "batch_matmul", for export: LiteRT runs FULLY_CONNECTED with non-constant weights (our
# weights are variables or signature inputs) on a slow path, and its converter emits
# FULLY_CONNECTED for any ``x @ w.T`` (even with an explicit transpose), so exported programs
# write products as a batched ``x @ transpose(w)``, which stays a BATCH_MATMUL, with custom
# VJPs so that the backward pass has the same form (measured: benchmarks/README.md). A
# ``ModelConfig.matmul`` field carries the choice to every product.
MATMUL_FORMS = ("einsum", "batch_matmul")
# Every product's output carries this name (``jax.ad_checkpoint.checkpoint_name``; an
# identity otherwise): a remat policy that saves only these keeps a block's backward pass
# from recomputing its matmuls (``programs.sharded``'s saved-residual signatures).
MATMUL_OUT = "matmul_out"


@jax.custom_vjp
def _xwt(x, w):
    """x (..., q) @ w (p, q).T as a batched matmul against a materialised transpose."""
    y = jnp.einsum("bmq,bqp->bmp", x.reshape(1, -1, x.shape[-1]), jnp.transpose(w)[None])
    return y.reshape(*x.shape[:-1], w.shape[0])


def _xwt_fwd(x, w):
    return _xwt(x, w), (x, w)


def _xwt_bwd(res, g):
    x, w = res
    return jnp.einsum("...p,pq->...q", g, w), jnp.einsum("...p,...q->pq", g, x)


_xwt.defvjp(_xwt_fwd, _xwt_bwd)


@jax.custom_vjp
def _xw(x, w):
    return jnp.einsum("...q,qp->...p", x, w)


def _xw_fwd(x, w):
    return _xw(x, w), (x, w)


def _xw_bwd(res, g):
    x, w = res
    return _xwt(g, w), jnp.einsum("...q,...p->qp", x, g)


_xw.defvjp(_xw_fwd, _xw_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _eprod(x, w, w_is_out_in: bool):
    """The desktop's form of a product: x (..., q) @ w.T for w (p, q) (``w_is_out_in``,
    torch's Linear) or x @ w for w (q, p) (GPT-2's Conv1D), as a plain einsum whose backward
    pass materialises the activation it transposes for the weight gradient. Autodiff's own
    backward let XLA fuse that transpose into the elementwise op that produced it (SiLU's
    or GELU's derivative): a strided loop that took 16 ms per MLP projection of SmolLM2
    (b4×s128) where the plain copy takes 1 (benchmarks/README.md, "the desktop trainer")."""
    return jnp.einsum("...q,pq->...p" if w_is_out_in else "...q,qp->...p", x, w)


def _eprod_fwd(x, w, w_is_out_in):
    return _eprod(x, w, w_is_out_in), (x, w)


def _eprod_bwd(w_is_out_in, res, g):
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    barrier = jax.lax.optimization_barrier
    if w_is_out_in:       # dW (p, q) = g^T x: the transpose falls on g
        return (jnp.einsum("...p,pq->...q", g, w), jnp.einsum("tp,tq->pq", barrier(g2), x2))
    # dW (q, p) = x^T g: the transpose falls on x
    return jnp.einsum("...p,qp->...q", g, w), jnp.einsum("tq,tp->qp", barrier(x2), g2)


_eprod.defvjp(_eprod_fwd, _eprod_bwd)


def matmul_t(x, w, form: str = "einsum"):
    """x (..., q) @ w (p, q).T -> (..., p), written as ``form`` (``MATMUL_FORMS``)."""
    y = _xwt(x, w) if form == "batch_matmul" else _eprod(x, w, True)
    return checkpoint_name(y, MATMUL_OUT)


def matmul(x, w, form: str = "einsum"):
    """x (..., q) @ w (q, p) -> (..., p), written as ``form``."""
    y = _xw(x, w) if form == "batch_matmul" else _eprod(x, w, False)
    return checkpoint_name(y, MATMUL_OUT)


def linear(x, w, b=None, form: str = "einsum"):
    """torch.nn.Linear layout: w is (out, in)."""
    y = matmul_t(x, w, form)
    return y if b is None else y + b


def conv1d(x, w, b=None, form: str = "einsum"):
    """GPT-2's Conv1D layout: w is (in, out)."""
    y = matmul(x, w, form)
    return y if b is None else y + b


class LoraCtx(NamedTuple):
    """What a forward needs to apply LoRA adapters found in the params: PEFT's scaling
    (alpha / r, or alpha / sqrt(r) with rsLoRA), dropout on the adapter input (training
    only) and the key for that dropout."""
    scale: float
    dropout: float = 0.0
    key: jax.Array | None = None


def dense(lp: dict, name: str, x, lora: LoraCtx | None = None, form: str = "einsum",
          conv1d_layout: bool = False):
    """A linear layer by module name: ``lp[name.weight]`` (+ ``.bias``), plus the LoRA path
    ``scale * B(A(dropout(x)))`` when ``lp`` holds ``name.lora_A.weight`` (r, in) and
    ``name.lora_B.weight`` (out, r) — PEFT's layout for both Linear and Conv1D bases."""
    w, b = lp[name + ".weight"], lp.get(name + ".bias")
    y = conv1d(x, w, b, form) if conv1d_layout else linear(x, w, b, form)
    a_name = name + ".lora_A.weight"
    if lora is not None and a_name in lp:
        xa = x
        if lora.dropout > 0.0 and lora.key is not None:
            key = jax.random.fold_in(lora.key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            keep = jax.random.bernoulli(key, 1.0 - lora.dropout, x.shape)
            xa = jnp.where(keep, x / (1.0 - lora.dropout), 0.0)
        b_w = lp[name + ".lora_B.weight"]
        if form == "einsum":
            y = y + lora_delta(xa, lp[a_name], b_w, lora.scale)
        else:
            y = y + lora.scale * linear(linear(xa, lp[a_name], form=form), b_w, form=form)
    return y


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x, a, b, scale: float):
    """``scale * x @ a.T @ b.T``: x (..., in), a (r, in), b (out, r) -> (..., out).

    The desktop's form of the LoRA product. Its backward forms each gradient with the
    token axis contracted against an operand that is already (tokens, features), so XLA
    transposes only rank-r tensors: autodiff of the plain product had it materialise the
    (out, tokens) transpose of the incoming gradient for b's gradient (GPT-2 small LoRA:
    ~7 % of the step, benchmarks/README.md)."""
    return _lora_fwd(x, a, b, scale)[0]


def _lora_fwd(x, a, b, scale):
    u = jnp.einsum("...q,rq->...r", x, a)                              # (..., r)
    return scale * jnp.einsum("...r,pr->...p", u, b), (x, a, b, u)


def _lora_bwd(scale, res, g):
    x, a, b, u = res
    lead = x.shape[:-1]
    x2, g2, u2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])
    v = jnp.einsum("tp,pr->tr", g2, b) * scale                         # (tokens, r)
    db = (jnp.einsum("tr,tp->rp", u2, g2) * scale).T                   # (out, r)
    da = jnp.einsum("tr,tq->rq", v, x2)                                # (r, in)
    dx = jnp.einsum("tr,rq->tq", v, a).reshape(*lead, x.shape[-1])
    return dx, da, db


lora_delta.defvjp(_lora_fwd, _lora_bwd)


def denses(lp: dict, lora: LoraCtx | None, form: str, conv1d_layout: bool = False):
    """``dense`` bound to one layer's params: ``(name, x) -> y``."""
    return lambda name, x: dense(lp, name, x, lora, form, conv1d_layout)


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


def rms_norm(x, w, eps, plus_one=False):
    """RMSNorm; Gemma scales by (1 + w), Llama/Qwen by w."""
    y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + eps)
    return y * (1.0 + w) if plus_one else y * w


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def rope(x, positions, theta: float, scaling_factor: float = 1.0):
    """Rotary embedding, HF "rotate_half" convention (first half / second half of Dh).

    x: (B, T, N, Dh); positions: (T,) int. Linear scaling divides positions by the factor.
    """
    dh = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    angles = (positions.astype(jnp.float32) / scaling_factor)[:, None] * inv_freq  # (T, Dh/2)
    cos = jnp.cos(angles)[None, :, None, :]                                       # (1, T, 1, Dh/2)
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class KVCache(NamedTuple):
    """Keys/values for every layer, preallocated to ``max_len`` positions.

    k, v: tuples (one per layer) of (B, max_len, K, Dh); length: int32 scalar, the number
    of positions already written.
    """
    k: tuple
    v: tuple
    length: jax.Array

    @classmethod
    def zeros(cls, num_layers, batch, max_len, kv_heads, head_dim, dtype=jnp.float32):
        z = jnp.zeros((batch, max_len, kv_heads, head_dim), dtype)
        return cls(tuple(z for _ in range(num_layers)), tuple(z for _ in range(num_layers)),
                   jnp.zeros((), jnp.int32))


def attend(q, k, v, q_pos, k_pos, *, scale, k_valid=None, window=None, softcap=None):
    """Causal grouped-query attention.

    q: (B, T, H, Dh); k, v: (B, S, K, Dh); q_pos: (T,), k_pos: (S,) absolute positions;
    k_valid: optional (S,) bool for cache slots that hold real keys; window: a key j is
    visible from query i only if i - j < window (HF's sliding-window rule).
    Returns (B, T, H, Dh).
    """
    b, t, h, dh = q.shape
    kh = k.shape[2]
    q = q.reshape(b, t, kh, h // kh, dh)                            # (B, T, K, G, Dh)
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * scale               # (B, K, G, T, S)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    mask = k_pos[None, :] <= q_pos[:, None]                          # (T, S)
    if window is not None:
        mask = mask & (q_pos[:, None] - k_pos[None, :] < window)
    if k_valid is not None:
        mask = mask & k_valid[None, :]
    s = jnp.where(mask, s, NEG_INF)
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v)                       # (B, T, K, G, Dh)
    return o.reshape(b, t, h, dh)


class CacheRows(NamedTuple):
    """A layer's KV cache that is read, not written: (B, S, K, Dh) keys and values of which
    the first ``length`` slots are real. Attention runs over those and the new positions,
    and the new positions' own keys/values come back for the caller to store (the phone's
    decoder keeps the cache on the host and writes the rows itself)."""
    k: jax.Array
    v: jax.Array
    length: jax.Array


def attend_with_cache(q, k_new, v_new, positions, layer_cache, *, scale, window=None,
                      softcap=None):
    """Attention for one layer, optionally writing into / reading from a KV cache.

    layer_cache: None (plain forward over the T new positions), (k_buf, v_buf, length)
    where the buffers are (B, max_len, K, Dh), or ``CacheRows``. Returns (out, (k_buf,
    v_buf) updated, or for ``CacheRows`` the new (k, v) rows; or None).
    """
    if isinstance(layer_cache, CacheRows):
        s, t = layer_cache.k.shape[1], q.shape[1]
        slots = jnp.arange(s, dtype=positions.dtype)
        k_all = jnp.concatenate([layer_cache.k, k_new.astype(layer_cache.k.dtype)], axis=1)
        v_all = jnp.concatenate([layer_cache.v, v_new.astype(layer_cache.v.dtype)], axis=1)
        valid = jnp.concatenate([slots < layer_cache.length, jnp.ones((t,), bool)])
        out = attend(q, k_all, v_all, positions, jnp.concatenate([slots, positions]),
                     scale=scale, k_valid=valid, window=window, softcap=softcap)
        return out, (k_new, v_new)
    if layer_cache is None:
        return attend(q, k_new, v_new, positions, positions, scale=scale, window=window,
                      softcap=softcap), None
    k_buf, v_buf, length = layer_cache
    k_buf = jax.lax.dynamic_update_slice_in_dim(k_buf, k_new.astype(k_buf.dtype), length, 1)
    v_buf = jax.lax.dynamic_update_slice_in_dim(v_buf, v_new.astype(v_buf.dtype), length, 1)
    k_pos = jnp.arange(k_buf.shape[1], dtype=positions.dtype)
    valid = k_pos < length + q.shape[1]
    out = attend(q, k_buf, v_buf, positions, k_pos, scale=scale, k_valid=valid, window=window,
                 softcap=softcap)
    return out, (k_buf, v_buf)


def split_heads(x, n, dh):
    return x.reshape(*x.shape[:-1], n, dh)                           # (B, T, N, Dh)


def merge_heads(x):
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])       # (B, T, N*Dh)
