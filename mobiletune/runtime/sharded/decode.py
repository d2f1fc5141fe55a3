"""KV-cache decoding of a sharded bundle (micro-batch 1; ``mobiletune.programs.sharded``'s
``block_prefill`` / ``block_decode`` / ``norm_decode`` are its JAX reference).

  prefill:  h = embed(tokens); per layer h, k_i, v_i = block_prefill(h, W_i)   (T positions)
  decode:   h = embed(token) (+ position row); per layer
            h, k, v = block_decode(h, pos, cache_i, W_i); cache_i[pos] = k, v
  both:     hn = norm_decode(h at the last position); logits = head @ hn    (host)

The cache lives on the host (``runtime.runner.HostCache``). Decoding keeps the whole model
resident: each layer's ``block_decode`` runs on an interpreter of its own with the layer's
weights pinned as inputs (``runtime.litert.PinnedCall``), so a token moves only its hidden
state and the layer's cache through LiteRT, and the head is held widened to float32. Memory:
about the model in float32 plus the cache (prefill streams weights from the store as
training does). Built at the first ``decode``; a new state rebuilds it.
"""

from __future__ import annotations

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.litert import PinnedCall
from mobiletune.runtime.runner import HostCache, check_position, padded_tokens


class ShardedDecoder:
    def __init__(self, runner):
        self.r, self.m, self.lay = runner, runner.manifest, runner.lay
        self.head = np.ascontiguousarray(runner.weight(self.lay.head), np.float32)  # (V, D)
        self.norm = {B.W + n: runner.weight(n) for n in self.lay.norm}
        self.layers: list[PinnedCall] | None = None

    def _logits(self, h) -> np.ndarray:
        """(V,) logits of one hidden state (1, 1, D): the final norm, then the head."""
        hn = self.r.call(B.NORM_DECODE, {"h": h, **self.norm})["hn"][0, 0]
        logits = self.head @ hn
        c = self.r.softcap
        return logits if c is None else np.tanh(logits / np.float32(c)) * np.float32(c)

    def prefill(self, tokens) -> tuple[np.ndarray, HostCache]:
        ids = padded_tokens(self.m, tokens)
        h = self.r.embed(ids)                                                # (1, T, D)
        cache = HostCache(self.m)
        for i, ly in enumerate(self.lay.layers):
            out = self.r.call(B.block_prefill_sig(ly.kind), {"h": h, **self.r._layer_inputs(i)})
            h = out["h"]
            cache.k[i], cache.v[i] = out["k"][0], out["v"][0]
        n = len(tokens)
        return self._logits(np.ascontiguousarray(h[:, n - 1:n])), cache

    def _pin(self) -> list[PinnedCall]:
        d = self.r.dir / B.PROGRAM
        c = self.m.model
        shape = (1, self.m.seq_len, c["num_kv_heads"], c["head_dim"])          # (1, T, K, Dh)
        zero = {"h": np.zeros((1, 1, int(self.m.model["hidden_size"])), np.float32),
                "pos": np.zeros((1,), np.int32), B.K_CACHE: np.zeros(shape, np.float32),
                B.V_CACHE: np.zeros(shape, np.float32)}
        return [PinnedCall(d, B.block_decode_sig(ly.kind), self.r._layer_inputs(i), zero,
                           self.r.call.threads) for i, ly in enumerate(self.lay.layers)]

    def decode(self, token: int, pos: int, cache: HostCache) -> np.ndarray:
        check_position(self.m, pos)
        if self.layers is None:
            self.layers = self._pin()
        ids = np.full((1, 1), token, np.int32)
        h = self.r.embed_at(ids, pos)                                        # (1, 1, D)
        p = np.full((1,), pos, np.int32)
        for i, call in enumerate(self.layers):
            out = call({"h": h, "pos": p, B.K_CACHE: cache.k[i:i + 1],
                        B.V_CACHE: cache.v[i:i + 1]})
            h = out["h"]
            cache.k[i, pos], cache.v[i, pos] = out["k"][0, 0], out["v"][0, 0]
        return self._logits(h)
