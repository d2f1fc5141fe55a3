"""``ShardedRunner``: one micro-batch through a sharded bundle's per-block signatures.

  h_0 = embed(tokens)                           host: rows read from the weight store
  h_{i+1} = block_fwd(h_i, W_i)                 every layer, h_i kept (B·T·D each)
  hn = norm_fwd(h_L)
  per vocabulary chunk: head_fwd(hn, W_c)       the host merges the chunks' log-sum-exp
                                                and softmax-weighted rows online (or the
                                                chunk in numpy, head="host": ``head.py``)
  [head_wgrad per chunk, when the head trains; head="host": numpy too]
  dh = norm_bwd(h_L, dhn); dh, dW_i = block_bwd(h_i, dh, W_i)   (recomputes the block)
     or, for the last n layers when the memory budget has room for their residuals R_i:
     h_{i+1}, R_i = block_fwd_save(h_i, W_i) ... dh, dW_i = block_bwd_saved(dh, R_i, W_i)
  [embedding gradient: a host scatter-add, when the embedding trains]

SplitLoRA (``runtime.split``) runs the same chain cut at layer k: ``hidden_states(ids, k)``
up, the server's dL/dh_k down, ``backward_blocks`` for layers k-1 ... 0.

Memory: the trainable state (or, streamed through ``state_store``, the shard in use: a
layer's tensors and gradients are released once its signature has run), the boundary
activations (one (B, T, D) per layer), one layer's widened weights (or one vocabulary
chunk of the head) and the interpreter's arenas. ``memory_budget_mb``: the headroom left
after the first micro-batch (the budget less its peak RSS and 64 MB; it saves nothing) goes
first to saved residuals (no recompute for the last n layers, n as many as fit, with the
saving signatures' arenas charged as ``ARENA_LAYERS`` more), then to widened weights kept
between the passes (``weights.LayerCache``); ``memory_plan`` keeps the decision for resume.
It is a ``runtime.runner.Runner``; open it with ``runtime.runner.open_bundle``.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.metrics import peak_rss_mb
from mobiletune.runtime.runner import check_variant, padded_tokens
from mobiletune.runtime.sharded import optimizer
from mobiletune.runtime.sharded.head import head_chunk, head_wgrad_chunk
from mobiletune.runtime.sharded.host_state import HostState
from mobiletune.runtime.sharded.weights import LayerCache, WeightStore

# The saved-residual signatures' own interpreter arenas, in layers' worth of residuals,
# charged to the budget once: measured on GPT-2 small LoRA b4×s128, 12 layers saved, peak
# RSS +358 MB = 198 MB of residuals + ~160 MB (the two signatures' arenas: ~10 layers).
ARENA_LAYERS = 10
# Where a training step's head chunks run: the bundle's ``head_fwd`` signature in LiteRT
# (the default) or numpy on the host (``head.py``; faster on the x86 machines measured, but
# OpenBLAS's threaded sgemm hung in a non-main thread — a federated simulation's server —
# so it is opt-in, for the main thread).
HEADS = ("host", "program")


def layer_inputs(lay: B.ShardedLayout, i: int, weight) -> dict:
    """Layer ``i``'s weight inputs (``W`` + its relative names; ``weight(full name)``) and,
    where the layer has them, its attention scalars."""
    ly = lay.layers[i]
    kind = lay.kinds[ly.kind]
    w = {B.W + r: weight(ly.prefix + r) for r in kind.frozen + kind.trainable}
    if ly.attn is not None:
        theta, factor, window = ly.attn
        w.update(rope_theta=np.float32(theta), rope_factor=np.float32(factor),
                 window=np.int32(window))
    return w


def embed_rows_at(lay: B.ShardedLayout, rows, n_positions: int | None, ids, pos: int) -> np.ndarray:
    """The embedding of (1, C) token ids at positions ``pos`` ... (decoding): ``rows(name,
    ids)`` reads a table's rows; learned position rows past the table's ``n_positions``,
    for padding, repeat its last row."""
    h = rows(lay.embed, ids)
    if lay.positions:
        at = np.minimum(pos + np.arange(ids.shape[1]), n_positions - 1)
        h = h + rows(lay.positions, at)[None]
    if lay.embed_scale is not None:
        h = h * np.float32(lay.embed_scale)
    return h.astype(np.float32, copy=False)


class ShardedRunner:
    def __init__(self, bundle_dir: Path, manifest: B.Manifest, calls, memory_budget_mb=None,
                 state_dir=None, state_store: str = "auto", head: str = "program"):
        if head not in HEADS:
            raise B.BundleError(f"head={head!r}: expected one of {', '.join(HEADS)}")
        self.dir, self.manifest, self.call, self.head_on = Path(bundle_dir), manifest, calls, head
        self.lay = manifest.sharded
        self.store = WeightStore(self.dir / B.WEIGHTS)
        self.cache = LayerCache(self.store, memory_budget_mb)
        self.state = HostState(manifest, state_dir, state_store, memory_budget_mb)
        self.vocab = int(manifest.model["vocab_size"])
        self.softcap = manifest.model.get("final_logit_softcapping")
        self._decoder = None
        self.decode_constants = True   # False: decode over pinned weight inputs (benchmarks)
        self._room = None   # bytes for residuals + cached weights, after the first micro-batch
        self._saved: dict[int, dict] = {}   # layer -> its residuals, forward to backward

    # --- the Runner interface -------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        return self.state.get_state()

    def set_state(self, state: dict, zeros_for_missing: bool = False) -> None:
        self.state.set_state(state, zeros_for_missing)
        self._decoder = None                     # its pinned weights are the old state's

    def load_state(self, path, zeros_for_missing: bool = False) -> None:
        self.state.load(path, zeros_for_missing)
        self._decoder = None

    def release(self, *arrays) -> None:
        self.state.store.release(*arrays)

    @property
    def grad(self) -> dict:
        """The accumulated gradient of every trainable tensor (HF name -> array)."""
        return self.state.grad

    def _trains(self) -> None:
        if self.manifest.side is not None:
            raise B.BundleError(f"{self.dir}: a side-tuning bundle trains on a server: use "
                                f"`mobiletune device side-train`")

    def accumulate(self, batch: dict) -> tuple[float, float]:
        self._trains()
        check_variant(self.manifest, batch)
        nll, count = self._loss_and_grads(batch, grads=True)
        self.state.acc_nll[...] += np.float32(nll)
        self.state.acc_count[...] += np.float32(count)
        if self._room is None and self.cache.budget is not None:
            self._set_room(max(0, int((self.cache.budget - peak_rss_mb() - 64) * 2**20)),
                           len(batch["inputs"]))
        return nll, count

    def _set_room(self, room: int, k: int) -> None:
        self._room = room
        n = self.saved_layers(k)
        self.cache.set_capacity(room - (n + ARENA_LAYERS * (n > 0)) * self.residual_bytes(k))

    def memory_plan(self) -> dict | None:
        """What the budget decided (kept in checkpoints: a resumed run saves the same layers'
        residuals from its first micro-batch, so it continues bit for bit)."""
        if self._room is None:
            return None
        return {"budget_mb": self.cache.budget, "room": self._room}

    def describe_memory(self, k: int) -> str:
        """What the budget bought, for the log."""
        n, per = self.saved_layers(k), self.residual_bytes(k)
        return (f"{self._room / 2**20:.0f} MB of room: the last {n} of {len(self.lay.layers)} "
                f"layers save their residuals ({n * per / 2**20:.1f} MB at micro-batch {k}; no "
                f"recompute in their backward pass), up to {self.cache.capacity / 2**20:.0f} MB "
                f"of layer weights kept between the passes")

    def set_memory_plan(self, plan: dict | None) -> None:
        """Adopt a checkpoint's ``memory_plan`` when it was made under the same budget."""
        if plan and self.cache.budget is not None and plan.get("budget_mb") == self.cache.budget:
            self._set_room(int(plan["room"]), min(self.manifest.variants))

    def residual_bytes(self, k: int) -> int:
        """Bytes one layer's saved residuals take at micro-batch ``k`` (0: the bundle has
        no ``block_fwd_save`` signatures, or its kinds differ in them: the largest)."""
        sizes = [0]
        for kind in {ly.kind for ly in self.lay.layers}:
            name = B.block_fwd_save_sig(kind, k)
            if not any(s.name == name for s in self.manifest.signatures):
                return 0
            sizes.append(sum(int(np.prod(o.shape)) * 4 for o in
                             self.manifest.signature(name).outputs if o.name.startswith(B.R)))
        return max(sizes)

    def saved_layers(self, k: int) -> int:
        """How many layers (the last ones) save their residuals at micro-batch ``k``."""
        per = self.residual_bytes(k)
        if not self._room or not per:
            return 0
        return max(0, min(len(self.lay.layers), self._room // per - ARENA_LAYERS))

    def eval(self, batch: dict) -> tuple[float, float]:
        self._trains()
        check_variant(self.manifest, batch)
        return self._loss_and_grads(batch, grads=False)

    def apply(self) -> tuple[float, int]:
        self._decoder = None                     # its weights are the state's before the step
        return optimizer.apply(self.state, self.call)

    def infer(self, tokens, last: int) -> np.ndarray:
        """Next-token logits (V,) at position ``last``: the block chain with micro-batch 1,
        then the head row by row on the host (one position: a matrix-vector product)."""
        if 1 not in self.manifest.variants:
            raise B.BundleError(f"{self.dir}: inference needs the micro-batch-1 variant; "
                                f"export with --variants including 1")
        _, hn, _ = self._forward({"inputs": padded_tokens(self.manifest, tokens)})
        return self.logits_at(hn[0, last])

    def decoder(self):
        """The KV-cache decoder (``runtime.sharded.decode``), built on first use."""
        if self._decoder is None:
            from mobiletune.runtime.sharded.decode import ShardedDecoder
            # the runner keeps its decoder; the decoder, a weak reference back, so that
            # dropping the runner frees the decoder's copy of the model at once, not at a
            # later cyclic garbage collection
            self._decoder = ShardedDecoder(weakref.proxy(self), constants=self.decode_constants)
        return self._decoder

    def prefill(self, tokens):
        return self.decoder().prefill(tokens)

    def decode(self, token: int, pos: int, cache) -> np.ndarray:
        return self.decoder().decode(token, pos, cache)

    def hidden_states(self, ids, upto: int | None = None, weights: dict | None = None,
                      save: bool = False) -> list[np.ndarray]:
        """The backbone's hidden states h_0 (the embedding) ... h_upto (after layer upto-1;
        default: all L layers), each (k, T, D), for int32 token ids (k, T) — what
        side-tuning sends, and SplitLoRA's phone half (h_upto goes up to the server).
        ``weights``: full names -> arrays that replace the store's (an adapter folded in).
        ``save``: the last ``saved_layers`` layers keep their residuals for
        ``backward_blocks``."""
        ids = np.asarray(ids, np.int32)
        k = len(ids)
        hs = [self._embed(ids)]
        self._saved.clear()
        first_saved = len(self.lay.layers) - (self.saved_layers(k) if save else 0)
        for i, ly in enumerate(self.lay.layers[:upto]):
            ins = self.layer_inputs(i)
            if weights:
                ins.update({B.W + n[len(ly.prefix):]: v for n, v in weights.items()
                            if n.startswith(ly.prefix) and B.W + n[len(ly.prefix):] in ins})
            if i >= first_saved:
                out = self.call(B.block_fwd_save_sig(ly.kind, k), {"h": hs[-1], **ins})
                self._saved[i] = {r: v for r, v in out.items() if r.startswith(B.R)}
            else:
                out = self.call(B.block_fwd_sig(ly.kind, k), {"h": hs[-1], **ins})
            hs.append(out["h"])
            self._done(i)
        return hs

    def backward_blocks(self, ids, hs: list, dh: np.ndarray) -> None:
        """Given dL/dh_n for n = len(hs) - 1, run block_bwd for layers n-1 ... 0 (and the
        embedding's scatter-add when it trains), adding every gradient into the state's
        accumulators. ``hs`` as ``hidden_states`` returns them."""
        k, grad = len(ids), self.state.grad
        for i in reversed(range(len(hs) - 1)):
            ly = self.lay.layers[i]
            saved = self._saved.pop(i, None)
            if saved is None:
                out = self.call(B.block_bwd_sig(ly.kind, k), {"h": hs[i], "dh": dh,
                                                               **self.layer_inputs(i)})
            else:
                name = B.block_bwd_saved_sig(ly.kind, k)
                ins = {"h": hs[i], **self.layer_inputs(i)}
                want = [s.name for s in self.manifest.signature(name).inputs]
                out = self.call(name, {"dh": dh, **saved,
                                       **{x: ins[x] for x in want if x in ins}})
            self._add_grads(ly.prefix, out)
            self._done(i)
            dh = out["dh"]
        emb, pos = self.lay.embed, self.lay.positions
        if emb in grad or pos in grad:
            if self.lay.embed_scale is not None:
                dh = dh * np.float32(self.lay.embed_scale)
            if emb in grad:
                np.add.at(grad[emb], ids.reshape(-1), dh.reshape(-1, dh.shape[-1]))
            if pos in grad:
                grad[pos][: ids.shape[1]] += dh.sum(0)
            self.state.release_tensors([emb, pos])

    def embed(self, ids) -> np.ndarray:
        return self._embed(np.asarray(ids, np.int32))

    def final_norm(self, h) -> np.ndarray:
        """norm_fwd of (k, T, D) hidden states."""
        norm = {B.W + n: self.weight(n) for n in self.lay.norm}
        return self.call(B.norm_fwd_sig(len(h)), {"h": h, **norm})["hn"]

    def logits_at(self, h) -> np.ndarray:
        """(V,) logits of one final-normed hidden state (D,): the head row by row."""
        logits = np.empty(self.vocab, np.float32)
        for c0, n, w, _ in self._head_chunks():
            logits[c0:c0 + n] = w[:n] @ h
        if self.softcap is not None:
            logits = np.tanh(logits / np.float32(self.softcap)) * np.float32(self.softcap)
        return logits

    # --- weights --------------------------------------------------------------------------
    def weight(self, name: str) -> np.ndarray:
        return self.state.tensor.get(name) if name in self.state.tensor else self.cache.get(name)

    def _done(self, i: int) -> None:
        """Layer ``i``'s trainable tensors and gradients leave the resident set (a streamed
        state; a no-op in RAM), and so do the pages of its frozen weights' views."""
        ly = self.lay.layers[i]
        self.state.release_tensors(ly.prefix + r for r in self.lay.kinds[ly.kind].trainable)
        self.store.release_pending()

    def layer_inputs(self, i: int) -> dict:
        return layer_inputs(self.lay, i, self.weight)

    def release_pages(self) -> None:
        """The weight store's pages read since the last call leave the resident set."""
        self.store.release_pending()

    def _rows(self, name: str, ids) -> np.ndarray:
        """rows[ids] of a 2-D tensor, from the trainable state or the store."""
        t = self.state.tensor
        if name not in t:
            return self.store.gather_rows(name, ids)
        rows = t[name][ids]
        self.state.release_tensors([name])
        return rows

    def _embed(self, ids) -> np.ndarray:
        h = self._rows(self.lay.embed, ids)
        if self.lay.positions:
            h = h + self._rows(self.lay.positions, np.arange(ids.shape[1]))[None]
        if self.lay.embed_scale is not None:
            h = h * np.float32(self.lay.embed_scale)
        return h.astype(np.float32, copy=False)

    def embed_at(self, ids, pos: int) -> np.ndarray:
        p = self.lay.positions
        n = p and (self.state.shapes.get(p) or self.store.shape(p))[0]
        return embed_rows_at(self.lay, self._rows, n, ids, pos)

    def _head_chunks(self):
        """(row offset, rows, float32 (Vc, D) weights, col_valid) per vocabulary chunk."""
        name, vc, t = self.lay.head, self.lay.vocab_chunk, self.state.tensor
        v, d = self.state.shapes.get(name) or self.store.shape(name)
        buf = np.zeros((vc, d), np.float32)
        valid = np.ones(vc, np.float32)
        for c0 in range(0, v, vc):
            n = min(vc, v - c0)
            if name in t:
                buf[:n] = t[name][c0:c0 + n]
                self.release(t[name][c0:c0 + n])
            else:
                self.store.get(name, c0, c0 + n, out=buf)
            if n < vc:  # the last, partial chunk
                buf[n:] = 0
                valid = np.zeros(vc, np.float32)
                valid[:n] = 1
            yield c0, n, buf, valid

    # --- the chain ------------------------------------------------------------------------
    def _forward(self, batch, save: bool = False) -> tuple[list, np.ndarray, dict]:
        k = len(batch["inputs"])
        hs = self.hidden_states(batch["inputs"], save=save)
        norm = {B.W + n: self.weight(n) for n in self.lay.norm}
        hn = self.call(B.norm_fwd_sig(k), {"h": hs[-1], **norm})["hn"]
        self.state.release_tensors(self.lay.norm)
        self.store.release_pending()
        return hs, hn, norm

    def _head(self, k, hn, targets, grads: bool):
        """Merge the vocabulary chunks online: log-sum-exp, target logit, and (grads) the
        softmax-weighted rows u and the target's row t, so dhn = mask · (u - t)."""
        lse = np.full(targets.shape, -np.inf, np.float32)
        tl = np.zeros(targets.shape, np.float32)
        tg = np.zeros(targets.shape, np.float32)
        u = np.zeros(hn.shape, np.float32) if grads else None
        for c0, n, w, valid in self._head_chunks():
            labels = (targets - c0).astype(np.int32)
            if self.head_on == "host":
                o = head_chunk(hn, w[:n], labels, self.softcap)
            else:
                o = self.call(B.head_fwd_sig(k), {"hn": hn, "w": w, "col_valid": valid,
                                                  "labels": labels})
            new = np.logaddexp(lse, o["lse"])
            if grads:
                u = u * np.exp(lse - new)[..., None] + o["u"] * np.exp(o["lse"] - new)[..., None]
            lse = new
            tl += o["target_logit"]
            if "target_g" in o:
                tg += o["target_g"]
        t = None
        if grads:
            t = self._rows(self.lay.head, np.clip(targets, 0, self.vocab - 1))
            if self.softcap is not None:
                t = t * tg[..., None]
        return lse, tl, u, t

    def _loss_and_grads(self, batch, grads: bool) -> tuple[float, float]:
        k = len(batch["inputs"])
        ids = np.asarray(batch["inputs"], np.int32)
        targets = np.asarray(batch["targets"], np.int32)
        mask = np.asarray(batch["loss_mask"], np.float32)
        hs, hn, norm = self._forward(batch, save=grads)
        lse, tl, u, t = self._head(k, hn, targets, grads)
        nll = float(((lse - tl) * mask).sum(dtype=np.float32))
        count = float(mask.sum(dtype=np.float32))
        if not grads:
            return nll, count
        dhn = ((u - t) * mask[..., None]).astype(np.float32)
        grad, head = self.state.grad, self.lay.head
        if head in grad:
            for c0, n, w, valid in self._head_chunks():
                labels = (targets - c0).astype(np.int32)
                if self.head_on == "host":
                    g = head_wgrad_chunk(hn, w[:n], labels, lse, mask, self.softcap)
                else:
                    g = self.call(B.head_wgrad_sig(k), {"hn": hn, "w": w, "col_valid": valid,
                                                        "labels": labels, "lse": lse,
                                                        "mask": mask})["g"]
                grad[head][c0:c0 + n] += g[:n]
                self.release(grad[head][c0:c0 + n])
        out = self.call(B.norm_bwd_sig(k), {"h": hs[-1], "dhn": dhn, **norm})
        self._add_grads("", out)
        self.state.release_tensors(self.lay.norm)
        self.backward_blocks(ids, hs, out["dh"])
        return nll, count

    def _add_grads(self, prefix: str, out: dict) -> None:
        for key, g in out.items():
            if key.startswith(B.G):
                self.state.grad[prefix + key[len(B.G):]] += g
