"""Perplexity, with one definition shared by our CLI and the transformers reference.

Tokenize the whole text without special tokens; cut consecutive non-overlapping windows
of ``seq_len`` tokens, dropping a partial last window; keep the first ``max_windows``.
When the tokenizer adds a BOS token (Gemma) the model input is BOS + window, otherwise
the window. The loss is summed over predicting every window token that has at least one
input token before it; perplexity = exp(total NLL / number of predicted tokens).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune import models
from mobiletune.errors import DataError


def ppl_windows(ids, seq_len: int, max_windows: int | None, bos_id: int | None) -> np.ndarray:
    """(N, seq_len [+1]) int32 model inputs, per the definition above."""
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of "
                        f"--seq-len {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    w = np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)
    if bos_id is not None:
        w = np.concatenate([np.full((n, 1), bos_id, np.int32), w], axis=1)
    return w


def _nll(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).sum()


@partial(jax.jit, static_argnums=(1, 3))
def sequence_nll(params, cfg, tokens, lora=None):
    """Summed NLL of predicting tokens[:, 1:] from their prefixes. tokens: (B, T)."""
    return _nll(models.forward(params, cfg, tokens, lora=lora)[0], tokens)


@partial(jax.jit, static_argnums=(2, 3))
def side_sequence_nll(side, params, cfg, scfg, tokens):
    """As ``sequence_nll`` through backbone + side network (``models.side``)."""
    from mobiletune.models.side import side_logits
    return _nll(side_logits(side, params, cfg, scfg, tokens), tokens)


def perplexity(params, cfg, windows: np.ndarray, progress=None, lora=None,
               side=None) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) over model-input windows; ``side``:
    (side params, SideConfig) of a side network to add to the model."""
    total, count = 0.0, 0
    for w in windows:
        x = jnp.asarray(w[None])
        total += float(sequence_nll(params, cfg, x, lora) if side is None
                       else side_sequence_nll(side[0], params, cfg, side[1], x))
        count += w.shape[0] - 1
        if progress is not None:
            progress(w.shape[0])
    return math.exp(total / count), count
