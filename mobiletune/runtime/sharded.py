"""Run a sharded training bundle: weights streamed from a memory-mapped store, one block
program reused for every layer (see ``mobiletune.programs.sharded`` for the chain it runs).

``ShardedRunner`` has ``BundleRunner``'s training interface (``accumulate``, ``apply``,
``eval``, ``get_state``, ``set_state``), so the device trainer, the energy scheduler and the
checkpoints work unchanged. The trainable state lives on the host as one flat float32
vector per optimizer group (a shard: a layer or the outer tensors, split by weight decay);
the contract names (``trainable/<hf name>``, ``acc/<hf name>``, ``opt/<group>/<leaf>``)
are views into those vectors.

Memory: at any moment the process holds the trainable state, the boundary activations
(one (B, T, D) per layer), one layer's widened weights (or one vocabulary chunk of the
head) and the interpreter's arenas. ``memory_budget_mb`` lets it keep widened frozen
weights between the forward and backward passes (an LRU cache) as far as the budget
allows after the first micro-batch; without a budget nothing is cached.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from mobiletune.runtime.bundle import BundleError, Manifest
from mobiletune.runtime.metrics import rss_mb
from mobiletune.runtime.weight_store import WeightStore

W, G, S = "w__", "g__", "s__"
STORE = "weights.safetensors"


class _Group:
    def __init__(self, g: dict, shapes: dict, leaves: list, chunk: int):
        self.name, self.sig, self.size = g["name"], g["signature"], int(g["size"])
        self.p = np.zeros(self.size, np.float32)
        self.acc = np.zeros(self.size, np.float32)
        self.views, self.acc_views, o = {}, {}, 0
        for t in g["tensors"]:
            n = int(np.prod(shapes[t]))
            self.views[t] = self.p[o:o + n].reshape(shapes[t])
            self.acc_views[t] = self.acc[o:o + n].reshape(shapes[t])
            o += n
        self.opt = {}
        for name, shape, dtype in leaves:
            vec = tuple(shape) == (chunk,)
            self.opt[name] = np.zeros((self.size,) if vec else tuple(shape), dtype)


class ShardedRunner:
    def __init__(self, bundle_dir: Path, manifest: Manifest, calls, memory_budget_mb=None):
        self.dir, self.manifest, self.call = Path(bundle_dir), manifest, calls
        lay = self.lay = manifest.sharded
        self.store = WeightStore(self.dir / STORE)
        self.shapes = {s.name[len("trainable/"):]: tuple(s.shape) for s in manifest.state
                       if s.name.startswith("trainable/")}
        self.groups = [_Group(g, self.shapes, lay["opt_leaves"][g["signature"][len("opt_"):]],
                              lay["opt_chunk"]) for g in lay["groups"]]
        self.tensor = {t: g.views[t] for g in self.groups for t in g.views}
        self.grad = {t: g.acc_views[t] for g in self.groups for t in g.acc_views}
        self.acc_nll = np.zeros((), np.float32)
        self.acc_count = np.zeros((), np.float32)
        self.budget = memory_budget_mb
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_cap = 0 if memory_budget_mb is None else None  # None: set after 1st batch
        self._cache_bytes = 0
        self.vocab = int(manifest.model["vocab_size"])

    # --- state (the contract names) -----------------------------------------------------
    def _state_views(self) -> dict:
        out = {}
        for g in self.groups:
            out.update({f"trainable/{t}": v for t, v in g.views.items()})
            out.update({f"acc/{t}": v for t, v in g.acc_views.items()})
            out.update({f"opt/{g.name}/{n}": v for n, v in g.opt.items()})
        out["acc_nll"], out["acc_count"] = self.acc_nll, self.acc_count
        return out

    def get_state(self) -> dict[str, np.ndarray]:
        """Read-only views of the live state (no copy: a full fine-tune's state is 4× the
        model); they change with the next step, so write them out before training on."""
        out = {}
        for k, v in self._state_views().items():
            out[k] = v.view()
            out[k].flags.writeable = False
        return out

    def set_state(self, state: dict, zeros_for_missing: bool = False) -> None:
        views = self._state_views()
        specs = {s.name: s for s in self.manifest.state}
        missing = sorted(set(specs) - set(state))
        if missing and not zeros_for_missing:
            raise BundleError(f"state lacks tensor {missing[0]!r} (and {len(missing) - 1} more)")
        extra = sorted(set(state) - set(specs))
        if extra:
            raise BundleError(f"state tensor {extra[0]!r} is not part of this bundle's state")
        for name, spec in specs.items():
            if name not in state:
                views[name][...] = 0
                continue
            a = np.asarray(state[name])
            if tuple(a.shape) != tuple(spec.shape) or a.dtype != np.dtype(spec.dtype):
                raise BundleError(f"state tensor {name!r}: {a.dtype}{list(a.shape)}, the bundle "
                                  f"needs {spec.dtype}{list(spec.shape)}")
            views[name][...] = a

    # --- weights --------------------------------------------------------------------------
    def weight(self, name: str) -> np.ndarray:
        if name in self.tensor:
            return self.tensor[name]
        hit = self._cache.get(name)
        if hit is not None:
            self._cache.move_to_end(name)
            return hit
        a = self.store.get(name)
        if self._cache_cap:
            self._cache[name] = a
            self._cache_bytes += a.nbytes
            while self._cache_bytes > self._cache_cap and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= old.nbytes
        return a

    def _layer_inputs(self, i: int) -> dict:
        ly = self.lay["layers"][i]
        kind = self.lay["kinds"][ly["kind"]]
        w = {W + r: self.weight(ly["prefix"] + r) for r in kind["frozen"] + kind["trainable"]}
        if ly["attn"] is not None:
            theta, factor, window = ly["attn"]
            w.update(rope_theta=np.float32(theta), rope_factor=np.float32(factor),
                     window=np.int32(window))
        return w

    def _rows(self, name: str, ids) -> np.ndarray:
        """rows[ids] of a 2-D tensor, from the trainable state or the store."""
        return self.tensor[name][ids] if name in self.tensor else self.store.gather_rows(name, ids)

    def _embed(self, ids) -> np.ndarray:
        h = self._rows(self.lay["embed"], ids)
        if self.lay["positions"]:
            h = h + self._rows(self.lay["positions"], np.arange(ids.shape[1]))[None]
        if self.lay["embed_scale"] is not None:
            h = h * np.float32(self.lay["embed_scale"])
        return h.astype(np.float32, copy=False)

    def _head_chunks(self):
        """(row offset, rows, float32 (Vc, D) weights, col_valid) per vocabulary chunk."""
        name, vc = self.lay["head"], self.lay["vocab_chunk"]
        v, d = self.shapes.get(name) or self.store.shape(name)
        buf = np.zeros((vc, d), np.float32)
        valid = np.ones(vc, np.float32)
        for c0 in range(0, v, vc):
            n = min(vc, v - c0)
            if name in self.tensor:
                buf[:n] = self.tensor[name][c0:c0 + n]
            else:
                self.store.get(name, c0, c0 + n, out=buf)
            if n < vc:  # the last, partial chunk
                buf[n:] = 0
                valid = np.zeros(vc, np.float32)
                valid[:n] = 1
            yield c0, n, buf, valid

    # --- the chain ------------------------------------------------------------------------
    def _forward(self, batch) -> tuple[list, np.ndarray, dict]:
        k = len(batch["inputs"])
        ids = np.asarray(batch["inputs"], np.int32)
        hs = [self._embed(ids)]
        for i, ly in enumerate(self.lay["layers"]):
            out = self.call(f"block_fwd_{ly['kind']}_b{k}", {"h": hs[-1], **self._layer_inputs(i)})
            hs.append(out["h"])
        norm = {W + n: self.weight(n) for n in self.lay["norm"]}
        hn = self.call(f"norm_fwd_b{k}", {"h": hs[-1], **norm})["hn"]
        return hs, hn, norm

    def _head(self, k, hn, targets, grads: bool):
        """Merge the vocabulary chunks online: log-sum-exp, target logit, and (grads) the
        softmax-weighted rows u and the target's row t, so dhn = mask · (u - t)."""
        lse = np.full(targets.shape, -np.inf, np.float32)
        tl = np.zeros(targets.shape, np.float32)
        tg = np.zeros(targets.shape, np.float32)
        u = np.zeros(hn.shape, np.float32) if grads else None
        for c0, _, w, valid in self._head_chunks():
            o = self.call(f"head_fwd_b{k}", {"hn": hn, "w": w, "col_valid": valid,
                                              "labels": (targets - c0).astype(np.int32)})
            new = np.logaddexp(lse, o["lse"])
            if grads:
                u = u * np.exp(lse - new)[..., None] + o["u"] * np.exp(o["lse"] - new)[..., None]
            lse = new
            tl += o["target_logit"]
            if "target_g" in o:
                tg += o["target_g"]
        t = None
        if grads:
            t = self._rows(self.lay["head"], np.clip(targets, 0, self.vocab - 1))
            if self.manifest.model.get("final_logit_softcapping") is not None:
                t = t * tg[..., None]
        return lse, tl, u, t

    def _loss_and_grads(self, batch, grads: bool) -> tuple[float, float]:
        k = len(batch["inputs"])
        ids = np.asarray(batch["inputs"], np.int32)
        targets = np.asarray(batch["targets"], np.int32)
        mask = np.asarray(batch["loss_mask"], np.float32)
        hs, hn, norm = self._forward(batch)
        lse, tl, u, t = self._head(k, hn, targets, grads)
        nll = float(((lse - tl) * mask).sum(dtype=np.float32))
        count = float(mask.sum(dtype=np.float32))
        if not grads:
            return nll, count
        dhn = ((u - t) * mask[..., None]).astype(np.float32)
        head = self.lay["head"]
        if head in self.grad:
            for c0, n, w, valid in self._head_chunks():
                g = self.call(f"head_wgrad_b{k}", {"hn": hn, "w": w, "col_valid": valid,
                                                    "labels": (targets - c0).astype(np.int32),
                                                    "lse": lse, "mask": mask})["g"]
                self.grad[head][c0:c0 + n] += g[:n]
        out = self.call(f"norm_bwd_b{k}", {"h": hs[-1], "dhn": dhn, **norm})
        self._add_grads("", out)
        dh = out["dh"]
        for i in reversed(range(len(self.lay["layers"]))):
            out = self.call(f"block_bwd_{self.lay['layers'][i]['kind']}_b{k}",
                            {"h": hs[i], "dh": dh, **self._layer_inputs(i)})
            self._add_grads(self.lay["layers"][i]["prefix"], out)
            dh = out["dh"]
        emb = self.lay["embed"]
        if emb in self.grad or (self.lay["positions"] in self.grad):
            if self.lay["embed_scale"] is not None:
                dh = dh * np.float32(self.lay["embed_scale"])
            if emb in self.grad:
                np.add.at(self.grad[emb], ids.reshape(-1), dh.reshape(-1, dh.shape[-1]))
            if self.lay["positions"] in self.grad:
                self.grad[self.lay["positions"]][: ids.shape[1]] += dh.sum(0)
        return nll, count

    def _add_grads(self, prefix: str, out: dict) -> None:
        for key, g in out.items():
            if key.startswith(G):
                self.grad[prefix + key[len(G):]] += g

    # --- BundleRunner's interface ---------------------------------------------------------
    def _check(self, batch) -> None:
        k = len(batch["inputs"])
        if k not in self.manifest.variants:
            raise BundleError(f"micro-batch {k} has no signatures; variants: "
                              f"{list(self.manifest.variants)}")

    def accumulate(self, batch: dict) -> tuple[float, float]:
        self._check(batch)
        nll, count = self._loss_and_grads(batch, grads=True)
        self.acc_nll[...] += np.float32(nll)
        self.acc_count[...] += np.float32(count)
        if self._cache_cap is None:  # the first micro-batch measured what a step needs
            self._cache_cap = max(0, int((self.budget - rss_mb() - 64) * 2**20))
        return nll, count

    def eval(self, batch: dict) -> tuple[float, float]:
        self._check(batch)
        return self._loss_and_grads(batch, grads=False)

    def apply(self) -> tuple[float, int]:
        denom = np.float32(max(float(self.acc_count), 1.0))
        for g in self.groups:
            g.acc /= denom
        clip = self.lay["clip_norm"]
        if clip is not None:
            norm = np.float32(np.sqrt(sum(float(np.dot(g.acc, g.acc)) for g in self.groups)))
            if not norm < clip:  # optax.clip_by_global_norm: t / norm * max_norm
                for g in self.groups:
                    g.acc /= norm
                    g.acc *= np.float32(clip)
        step = 0
        c = self.lay["opt_chunk"]
        for g in self.groups:
            step = max(step, self._opt_group(g, c))
        loss = float(self.acc_nll / denom)
        for g in self.groups:
            g.acc[...] = 0
        self.acc_nll[...] = 0
        self.acc_count[...] = 0
        return loss, step

    def _opt_group(self, g: _Group, c: int) -> int:
        vec = {n for n, a in g.opt.items() if a.ndim == 1}  # the rest are scalars (count)
        scalars_before = {n: a.copy() for n, a in g.opt.items() if n not in vec}
        new_scalars = None
        pad = np.zeros(c, np.float32)
        for o in range(0, g.size, c):
            n = min(c, g.size - o)

            def chunk(a):
                if n == c:
                    return a[o:o + c]
                buf = pad.copy()
                buf[:n] = a[o:o + n]
                return buf
            ins = {"p": chunk(g.p), "g": chunk(g.acc)}
            ins.update({S + name: chunk(g.opt[name]) for name in vec})
            ins.update({S + name: v for name, v in scalars_before.items()})
            out = self.call(g.sig, ins)
            g.p[o:o + n] = out["p"][:n]
            for name in vec:
                g.opt[name][o:o + n] = out[S + name][:n]
            if new_scalars is None:
                new_scalars = {name: out[S + name] for name in scalars_before}
        for name, v in (new_scalars or {}).items():
            g.opt[name][...] = np.asarray(v).reshape(g.opt[name].shape)
        counts = [int(v) for name, v in g.opt.items() if name.endswith("count") and v.ndim == 0]
        return max(counts) if counts else 0

    def infer(self, tokens, last: int) -> np.ndarray:
        """Next-token logits (V,) at position ``last``: the block chain with micro-batch 1,
        then the head row by row on the host (one position: a matrix-vector product)."""
        if 1 not in self.manifest.variants:
            raise BundleError(f"{self.dir}: inference needs the micro-batch-1 variant; "
                              f"export with --variants including 1")
        t = np.zeros((1, self.manifest.seq_len), np.int32)
        t[0, : len(tokens)] = tokens
        _, hn, _ = self._forward({"inputs": t})
        h = hn[0, last]
        logits = np.empty(self.vocab, np.float32)
        for c0, n, w, _ in self._head_chunks():
            logits[c0:c0 + n] = w[:n] @ h
        cap = self.manifest.model.get("final_logit_softcapping")
        if cap is not None:
            logits = np.tanh(logits / np.float32(cap)) * np.float32(cap)
        return logits

