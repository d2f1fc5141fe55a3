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


@partial(jax.jit, static_argnums=(1, 3))
def sequence_nll(params, cfg, tokens, lora=None):
    """Summed NLL of predicting tokens[:, 1:] from their prefixes. tokens: (B, T)."""
    logits, _ = models.forward(params, cfg, tokens, lora=lora)        # (B, T, V)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = tokens[:, 1:]
    return -jnp.take_along_axis(logp, tgt[..., None], axis=-1).sum()


def perplexity(params, cfg, windows: np.ndarray, progress=None, lora=None) -> tuple[float, int]:
    """(perplexity, number of predicted tokens) over model-input windows."""
    total, count = 0.0, 0
    for w in windows:
        total += float(sequence_nll(params, cfg, jnp.asarray(w[None]), lora))
        count += w.shape[0] - 1
        if progress is not None:
            progress(w.shape[0])
    return math.exp(total / count), count
