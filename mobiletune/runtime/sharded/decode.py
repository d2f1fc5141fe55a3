"""KV-cache decoding of a sharded bundle (micro-batch 1; ``mobiletune.programs.sharded``'s
``block_decode`` / ``norm_decode`` are its JAX reference).

  a long prompt (> ``prefill_min`` tokens): h = embed(padded window);
      per layer: h, k_i, v_i = block_prefill(h, W_i)          (weights streamed, as training)
  a short prompt, and then each new token, per chunk of C tokens from position p (C = 1):
      h = embed(tokens) (+ position rows)                                  host
      per layer: h, k, v = block_decode(h, p, cache_i, W_i); cache_i[p:p+n] = k, v (n real)
  hn = norm_decode(h of the last real token); logits = head @ hn   host, rows / thread

The cache lives on the host (``runtime.runner.HostCache``). Decoding keeps the whole model
resident: each layer's ``block_decode`` runs on an interpreter of its own
(``runtime.litert.PinnedCall``: a call moves only the chunk's hidden states and the layer's
cache through LiteRT), over a program file with the layer's weights as constants
(``constant_decode``, schema 6 bundles: XNNPACK packs them once, ~2x faster a token) or,
for schema 5 bundles or ``constants=False``, the program's ``block_decode`` with the
weights pinned as inputs. The head is held widened to float32. Memory: about the model in
float32 plus the cache. Built at the first ``prefill`` (or ``decode``); a new state
rebuilds it (the constants are the state's weights).

It reads the model through ``runner``: ``manifest``, ``lay`` (the ``ShardedLayout``),
``dir``, ``call`` (the program's signatures), ``softcap``, ``weight(name)``,
``layer_inputs(i)``, ``embed_at(ids, pos)``, ``release_pages()`` — a ``ShardedRunner`` (a
weak proxy to it), or a monolithic bundle's ``runtime.monolithic_decode`` source.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.litert import PinnedCall, usable_cores
from mobiletune.runtime.runner import HostCache, check_position, padded_tokens
from mobiletune.runtime.sharded.constant_decode import drop_mapped_pages, write_program

# Prompts up to this many tokens go through block_decode one token at a time; longer ones
# through block_prefill's one pass over the padded window, weights streamed from the store.
# SmolLM2-135M, quiet machine, store pages cached: 24 ms a token over constant weights
# against block_prefill's 0.33 s, so the two meet at 13-14 tokens (pinned, at ~57 ms a
# token, sooner; with the store's pages on disk, block_prefill takes ~1 s and later).
PREFILL_MIN = 16


class ShardedDecoder:
    def __init__(self, runner, prefill_min: int = PREFILL_MIN, constants: bool = True):
        self.prefill_min = prefill_min
        self.r, self.m, self.lay = runner, runner.manifest, runner.lay
        kind = self.lay.layers[0].kind
        h = next(s for s in self.m.signature(B.block_decode_sig(kind)).inputs if s.name == "h")
        self.chunk = h.shape[1]
        self.head = np.array(runner.weight(self.lay.head), np.float32)  # (V, D), its own copy
        threads = runner.call.threads or usable_cores()              # as LiteRT runs
        cut = np.linspace(0, self.head.shape[0], threads + 1).astype(int)
        self._rows = list(zip(cut[:-1], cut[1:]))                  # the head's rows per thread
        self._pool = ThreadPoolExecutor(threads, "mobiletune-head") if threads > 1 else None
        self.norm = {B.W + n: np.array(runner.weight(n)) for n in self.lay.norm}  # copies
        c = self.m.model
        shape = (1, self.m.seq_len, c["num_kv_heads"], c["head_dim"])          # (1, T, K, Dh)
        zero = {"h": np.zeros((1, self.chunk, int(c["hidden_size"])), np.float32),
                "pos": np.zeros((1,), np.int32), B.K_CACHE: np.zeros(shape, np.float32),
                B.V_CACHE: np.zeros(shape, np.float32)}
        consts = self.lay.decode_consts if constants else {}
        skels = {k: (runner.dir / (B.decode_skeleton_role(k) + ".skel")).read_bytes()
                 for k in consts}
        self.layers = []
        with tempfile.TemporaryDirectory(prefix="mobiletune-decode-") as tmp:
            for i, ly in enumerate(self.lay.layers):
                self.layers.append(self._layer(i, ly.kind, consts.get(ly.kind),
                                               skels.get(ly.kind), zero, Path(tmp)))

    def _layer(self, i, kind, regions, skel, zero, tmp: Path) -> PinnedCall:
        """Layer ``i``'s decode interpreter. Each copies the layer's weights (packed
        constants, or pinned inputs), so the store's pages go now, not after the last layer
        (SmolLM2-135M: peak RSS 1308 -> ~800 MB)."""
        r, sig = self.r, B.block_decode_sig(kind)
        w = r.layer_inputs(i)
        if regions is None:
            call = PinnedCall(r.dir / B.PROGRAM, sig, w, zero, r.call.threads)
            r.release_pages()
            return call
        path = tmp / f"layer{i}.tflite"
        write_program(skel, regions, w, path)
        r.release_pages()
        names = {x.name for x in regions}
        call = PinnedCall(path, sig, {k: v for k, v in w.items() if k not in names}, zero,
                          r.call.threads)            # its first call packs the constants
        path.unlink()                                 # the mapping keeps the file until closed
        drop_mapped_pages(path)
        return call

    def _logits(self, h) -> np.ndarray:
        """(V,) logits of one hidden state (1, 1, D): the final norm, then the head."""
        hn = self.r.call(B.NORM_DECODE, {"h": h, **self.norm})["hn"][0, 0]
        # einsum, not ``@``: numpy's BLAS leaves its worker threads spinning after a call,
        # and on 2 cores they took the CPU from LiteRT's threads (30 layers: 65-70 ms a
        # token with einsum or one BLAS thread, 110-145 ms after a threaded BLAS matvec).
        # One einsum reads the head at one core's bandwidth (SmolLM2-135M: 7.4 ms, 15 GB/s);
        # einsum releases the GIL, so a slice of rows per thread reads it at both cores'
        # (3.9 ms), and the pool's idle threads wait on a lock, not spinning
        logits = np.empty(self.head.shape[0], np.float32)
        def rows(b):
            np.einsum("vd,d->v", self.head[b[0]:b[1]], hn, out=logits[b[0]:b[1]])
        if self._pool is None:
            rows(self._rows[0])
        else:
            list(self._pool.map(rows, self._rows))     # list(): waits, and raises what failed
        c = self.r.softcap
        return logits if c is None else np.tanh(logits / np.float32(c)) * np.float32(c)

    def _run(self, tokens, pos: int, cache: HostCache) -> np.ndarray:
        """Tokens at positions ``pos`` ... through every layer, chunk by chunk, writing the
        cache; the logits after the last one."""
        c = self.chunk
        for s in range(0, len(tokens), c):
            part = list(tokens[s:s + c])
            n, p = len(part), pos + s
            ids = np.zeros((1, c), np.int32)
            ids[0, :n] = part
            h = self.r.embed_at(ids, p)                                      # (1, C, D)
            at = np.full((1,), p, np.int32)
            for i, call in enumerate(self.layers):
                out = call({"h": h, "pos": at, B.K_CACHE: cache.k[i:i + 1],
                            B.V_CACHE: cache.v[i:i + 1]})
                h = out["h"]
                cache.k[i, p:p + n], cache.v[i, p:p + n] = out["k"][0, :n], out["v"][0, :n]
        return self._logits(np.ascontiguousarray(h[:, n - 1:n]))

    def prefill(self, tokens) -> tuple[np.ndarray, HostCache]:
        check_position(self.m, len(tokens) - 1)
        if len(tokens) <= self.prefill_min:
            cache = HostCache(self.m)
            return self._run(tokens, 0, cache), cache
        return self._window(tokens)

    def _window(self, tokens) -> tuple[np.ndarray, HostCache]:
        """A long prompt in one pass over the padded window (``block_prefill``)."""
        cache = HostCache(self.m)
        h = self.r.embed(padded_tokens(self.m, tokens))                     # (1, T, D)
        for i, ly in enumerate(self.lay.layers):
            out = self.r.call(B.block_prefill_sig(ly.kind), {"h": h, **self.r.layer_inputs(i)})
            self.r.release_pages()                 # the layer's weight pages, as in training
            h = out["h"]
            cache.k[i], cache.v[i] = out["k"][0], out["v"][0]
        n = len(tokens)
        return self._logits(np.ascontiguousarray(h[:, n - 1:n])), cache

    def decode(self, token: int, pos: int, cache: HostCache) -> np.ndarray:
        check_position(self.m, pos)
        return self._run([token], pos, cache)
