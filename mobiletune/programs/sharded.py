"""Sharded training: the model as a chain of small pure functions whose number does not grow
with depth — the JAX reference of a sharded bundle (``export/`` traces exactly these).

One optimizer step on the phone (``mobiletune.runtime.sharded``) runs, per micro-batch:

  h_0 = embed(tokens)                                 host: a gather from the weight store
  h_{i+1} = block_fwd(h_i, W_i)                       every layer, h_i kept (B·T·D each)
  hn = norm_fwd(h_L)
  per vocabulary chunk c (rows c·Vc … of the head): head_fwd(hn, W_c) -> the chunk's
      log-sum-exp, target logit, and its softmax- and target-weighted rows of W_c; the host
      merges chunks online, so the B·T·V logits never exist and the head is read once
  [head_wgrad(hn, W_c, lse, mask) -> dW_c, a second pass, only when the head trains]
  dh = norm_bwd(h_L, dhn);  dh, dW_i = block_bwd(h_i, dh, W_i)   (recomputes the block)
      or, where the host's memory budget allows (``block_fwd_save`` / ``block_bwd_saved``):
      h_{i+1}, R_i = block_fwd_save(h_i, W_i);  dh, dW_i = block_bwd_saved(dh, R_i, W_i)
      R_i: the block's matmul outputs (``SAVE_POLICY``), so the backward pass recomputes only
      the elementwise ops (norms, activations, softmax) from them
  [embedding gradient: host scatter-add, only when the embedding trains]
and then ``opt_decay`` / ``opt_nodecay`` (the recipe's optax optimizer, elementwise) over
fixed-size chunks of each shard's flattened trainable vector. Global-norm clipping is a
host-side reduction over all shards before the optimizer, as ``optax.clip_by_global_norm``.

Gradients are of the summed NLL (as ``Steps.accumulate``); the host divides by the token
count at ``apply``. Gemma's local/global layers share one block program: RoPE base, scaling
and window are signature inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mobiletune import families, models
from mobiletune.errors import MobiletuneError
from mobiletune.models import layers as L
from mobiletune.models.layers import NEG_INF
from mobiletune.programs.monolithic import leaf_path
from mobiletune.runtime import bundle as B
from mobiletune.runtime.bundle import G, S, Signature, TensorSpec, W, signature_shape
from mobiletune.train.optim import OptimConfig, decay_mask, make_optimizer

NO_WINDOW = 1 << 30                  # "global" attention as a window no sequence reaches
# Positions per block_decode call (the runtime reads it from the signature). One: LiteRT
# runs a one-row FULLY_CONNECTED on a faster path than a few rows (SmolLM2-135M, 30 pinned
# layers: 57 ms per call with 1 row, 106 with 4, 135 with 8).
DECODE_CHUNK = 1
# What ``block_fwd_save`` keeps for the backward pass: every product's output
# (``layers.MATMUL_OUT``); norms, activations, softmax and the attention scores (small
# products) are recomputed from them. Measured per layer at the bench shapes: GPT-2
# b4×s128 16.5 MB (61 MB saving everything), SmolLM2 b4×s128 9 MB, Qwen 2.5 0.5B 25 MB.
SAVE_POLICY = jax.checkpoint_policies.save_only_these_names(L.MATMUL_OUT)


class ResidualPlan(NamedTuple):
    """How ``block_bwd_saved`` rebuilds the block's VJP: its pytree structure, and for each
    leaf either the signature input it is (a str: ``h``, a weight) or its index in
    ``saved`` (the ``R`` outputs of ``block_fwd_save``)."""
    treedef: Any
    sources: tuple
    saved: tuple[TensorSpec, ...]

    def inputs(self) -> list[str]:
        """The signature inputs the backward pass reads besides ``dh`` and the residuals."""
        return sorted({s for s in self.sources if isinstance(s, str)})


def decode_cfg(cfg):
    """The config one-token decoding is traced with: products as einsum, which the converter
    makes FULLY_CONNECTED. For one row against weights that are inputs (pinned) or variables
    LiteRT runs that ~9x faster than the batched matmul against a materialised transpose
    that training uses (measured: a 1536x576 product, 0.25 ms vs 2.2-2.8 ms per call).
    Prefill (T rows) keeps the training form: as FULLY_CONNECTED it ran 2-3x slower."""
    return cfg.replace(matmul="einsum")


class ShardedModel:
    """Layout + signature functions for one (model, LoRA/full, optimizer, seq_len)."""

    def __init__(self, cfg, lcfg, optim: OptimConfig, trainable_shapes: dict, frozen_shapes: dict,
                 seq_len: int, vocab_chunk: int = 4096, opt_chunk: int = 1 << 16,
                 decode_chunk: int = DECODE_CHUNK):
        if lcfg is not None and lcfg.dropout > 0:
            raise MobiletuneError(f"lora.dropout={lcfg.dropout}: bundles train without dropout "
                                  f"(LiteRT has no random ops); --set lora.dropout=0")
        if optim.name == "adafactor":
            raise MobiletuneError("optim.name='adafactor' factors its second moments across a "
                                  "whole matrix; the sharded optimizer is elementwise: use adamw "
                                  "or sgd")
        self.cfg, self.lcfg, self.optim, self.seq_len = cfg, lcfg, optim, seq_len
        self.fam = models.family(cfg)
        self.spec = families.spec(cfg.family)
        self.shapes = {**frozen_shapes, **trainable_shapes}
        self.trainable = sorted(trainable_shapes)
        self.vocab_chunk = min(vocab_chunk, cfg.vocab_size)
        self.opt_chunk = opt_chunk
        self.decode_chunk = min(decode_chunk, seq_len)
        self.head = self.fam.output_weight({k: k for k in self.shapes}, cfg)  # its HF name
        self.head_trainable = self.head in trainable_shapes
        self.embed_name = self.spec.embed
        prefixes = [self.spec.prefix(i) for i in range(cfg.num_layers)]
        self.layers = []
        kinds: dict[tuple, str] = {}
        for i, p in enumerate(prefixes):
            rel = sorted(k[len(p):] for k in self.shapes if k.startswith(p))
            tr = tuple(r for r in rel if p + r in trainable_shapes)
            fr = tuple(r for r in rel if p + r not in trainable_shapes)
            key = (fr, tr, tuple(self.shapes[p + r] for r in rel))
            kind = kinds.setdefault(key, f"k{len(kinds)}")
            self.layers.append({"prefix": p, "kind": kind, "attn": self._attn(i)})
        self.kinds = {k: {"frozen": list(fr), "trainable": list(tr)}
                      for (fr, tr, _), k in kinds.items()}
        outer = [k for k in self.shapes if not k.startswith(tuple(prefixes))]
        self.norm_names = sorted(k for k in outer
                                 if k not in (self.head, self.embed_name, self.spec.positions))
        self.opt = {"decay": make_optimizer(dataclasses.replace(
                        optim, clip_norm=None, decay_norms_biases_embeddings=True)),
                    "nodecay": make_optimizer(dataclasses.replace(
                        optim, clip_norm=None, weight_decay=0.0))}
        self.groups = self._groups()
        self._plans: dict[tuple, ResidualPlan] = {}

    def _attn(self, i):
        if self.spec.attention_kind is None:
            return None
        theta, factor, window = self.spec.attention_kind(self.cfg, i)
        return [float(theta), float(factor), int(window or NO_WINDOW)]

    def _groups(self) -> list[dict]:
        """Optimizer groups: (shard, decay?) -> the trainable tensors flattened in order."""
        mask = decay_mask({k: None for k in self.trainable}, self.optim, self.cfg.family)
        shard_of = {}
        for i, lay in enumerate(self.layers):
            for r in self.kinds[lay["kind"]]["trainable"]:
                shard_of[lay["prefix"] + r] = f"layer.{i}"
        out = {}
        for k in self.trainable:
            name = f"{shard_of.get(k, 'outer')}.{'decay' if mask[k] else 'nodecay'}"
            out.setdefault(name, []).append(k)
        return [B.OptGroup(n, tuple(ts), n.rsplit(".", 1)[1],
                           int(sum(np.prod(self.shapes[t]) for t in ts)))
                for n, ts in sorted(out.items())]

    def opt_kinds(self) -> list[str]:
        """The optimizers the groups use: ``decay`` and/or ``nodecay``."""
        return sorted({g.optimizer for g in self.groups})

    # --- opt state layout -------------------------------------------------------------
    def opt_leaves(self, which: str) -> tuple[B.OptLeaf, ...]:
        """The optimizer state's leaves for one chunk vector."""
        st = self.opt[which].init({"p": jnp.zeros((self.opt_chunk,), jnp.float32)})
        paths, _ = jax.tree_util.tree_flatten_with_path(st)
        return tuple(B.OptLeaf(leaf_path(p), tuple(v.shape), str(v.dtype)) for p, v in paths)

    # --- signature functions ------------------------------------------------------------
    def _attn_of(self, kw):
        """RoPE base, scaling and window from a signature's inputs (None: no RoPE)."""
        if self.layers[0]["attn"] is None:
            return None
        return kw["rope_theta"], kw["rope_factor"], kw["window"]

    def _attn_specs(self) -> list[TensorSpec]:
        if self.layers[0]["attn"] is None:
            return []
        return [TensorSpec("rope_theta", (), "float32"), TensorSpec("rope_factor", (), "float32"),
                TensorSpec("window", (), "int32")]

    def _block_specs(self, kind: str, k: int) -> list[TensorSpec]:
        """block_fwd's inputs: h, the RoPE scalars, the kind's weights (frozen, trainable)."""
        p0 = next(lay["prefix"] for lay in self.layers if lay["kind"] == kind)
        rels = self.kinds[kind]["frozen"] + self.kinds[kind]["trainable"]
        return [TensorSpec("h", (k, self.seq_len, self.cfg.hidden_size), "float32"),
                *self._attn_specs(),
                *[TensorSpec(W + r, tuple(self.shapes[p0 + r]), "float32") for r in rels]]

    def _lora(self):
        return None if self.lcfg is None else self.lcfg.ctx()

    def block_fwd(self, h, attn, w):
        positions = jnp.arange(h.shape[1], dtype=jnp.int32)
        kw = {} if attn is None else {"attn": attn}
        return self.fam.block(w, self.cfg, 0, h, positions, None, self._lora(), **kw)[0]

    def block_bwd(self, h, dh, attn, w_frozen, w_train):
        _, vjp = jax.vjp(lambda x, wt: self.block_fwd(x, attn, {**w_frozen, **wt}), h, w_train)
        return vjp(dh)                                             # (dh_in, {name: grad})

    def _saving_vjp(self, kw: dict, fr, tr):
        """(h_out, saved residuals, treedef, sources) of the block under ``SAVE_POLICY``,
        ``kw`` the signature's inputs: each VJP leaf that *is* an input is named, not saved
        (weights and h are on the host already); repeated leaves are saved once."""
        def f(x, wt):
            return self.block_fwd(x, self._attn_of(kw), {**{r: kw[W + r] for r in fr}, **wt})
        out, vjp = jax.vjp(jax.checkpoint(f, policy=SAVE_POLICY), kw["h"],
                           {r: kw[W + r] for r in tr})
        leaves, treedef = jax.tree.flatten(vjp)
        saved, sources = [], []
        for x in leaves:
            src = next((n for n, v in kw.items() if v is x), None)
            if src is None:
                src = next((j for j, y in enumerate(saved) if y is x), len(saved))
                if src == len(saved):
                    saved.append(x)
            sources.append(src)
        return out, saved, treedef, tuple(sources)

    def residual_plan(self, kind: str, k: int) -> ResidualPlan:
        """The saved-residual layout of one block kind at micro-batch ``k`` (traced once)."""
        if (kind, k) not in self._plans:
            fr, tr = self.kinds[kind]["frozen"], self.kinds[kind]["trainable"]
            box = {}

            def f(kw):
                _, saved, treedef, sources = self._saving_vjp(kw, fr, tr)
                box["plan"] = (treedef, sources)
                return saved
            specs = self._block_specs(kind, k)
            shapes = jax.eval_shape(f, {s.name: jax.ShapeDtypeStruct(s.shape, s.dtype)
                                        for s in specs})
            bad = [str(x.dtype) for x in shapes if str(x.dtype) not in ("float32", "int32")]
            if bad:
                raise MobiletuneError(f"block kind {kind}: a saved residual of dtype {bad[0]}; "
                                      f"signatures carry float32 and int32 only")
            self._plans[(kind, k)] = ResidualPlan(*box["plan"], tuple(
                TensorSpec(f"{B.R}{i:02d}", tuple(x.shape), str(x.dtype))
                for i, x in enumerate(shapes)))
        return self._plans[(kind, k)]

    def block_fwd_save(self, kw: dict, kind: str, k: int) -> dict:
        plan = self.residual_plan(kind, k)
        names = self.kinds[kind]
        out, saved, _, sources = self._saving_vjp(kw, names["frozen"], names["trainable"])
        if sources != plan.sources:
            raise MobiletuneError(f"block kind {kind}: the saved residuals traced differently")
        return {"h": out, **{s.name: x for s, x in zip(plan.saved, saved)}}

    def block_bwd_saved(self, kw: dict, kind: str, k: int) -> dict:
        plan = self.residual_plan(kind, k)
        leaves = [kw[s] if isinstance(s, str) else kw[plan.saved[s].name] for s in plan.sources]
        dh, gw = jax.tree.unflatten(plan.treedef, leaves)(kw["dh"])
        return {"dh": dh, **{G + r: v for r, v in gw.items()}}

    def block_prefill(self, h, attn, w):
        """``block_fwd`` plus the block's keys and values of every position (1, T, K, Dh)."""
        t = h.shape[1]
        positions = jnp.arange(t, dtype=jnp.int32)
        z = jnp.zeros((h.shape[0], t, self.cfg.num_kv_heads, self.cfg.head_dim), jnp.float32)
        kw = {} if attn is None else {"attn": attn}
        h, (k, v) = self.fam.block(w, self.cfg, 0, h, positions, (z, z, jnp.int32(0)),
                                   self._lora(), **kw)
        return h, k, v

    def block_decode(self, h, pos, k_cache, v_cache, attn, w):
        """A chunk of C positions ``pos`` ... ``pos + C - 1`` (h: (1, C, D)) over the layer's
        cache (1, T, K, Dh), whose first ``pos`` slots are real: the new hidden states and
        their own keys/values (1, C, K, Dh), which the host writes into the cache. Rows past
        the real tokens are padding that no real row attends to (causal mask)."""
        positions = pos + jnp.arange(h.shape[1], dtype=jnp.int32)
        kw = {} if attn is None else {"attn": attn}
        h, (k, v) = self.fam.block(w, decode_cfg(self.cfg), 0, h, positions,
                                   L.CacheRows(k_cache, v_cache, pos), self._lora(), **kw)
        return h, k, v

    def norm_fwd(self, h, w):
        return self.fam.final_norm(w, self.cfg, h)

    def norm_bwd(self, h, dhn, w_frozen, w_train):
        _, vjp = jax.vjp(lambda x, wt: self.fam.final_norm({**w_frozen, **wt}, self.cfg, x),
                         h, w_train)
        return vjp(dhn)

    def _chunk_logits(self, hn, w, col_valid):
        z = L.matmul_t(hn, w, self.cfg.matmul)                                     # (B, T, Vc)
        g = None
        c = self.cfg.final_logit_softcapping
        if c is not None:
            t = jnp.tanh(z / c)
            z, g = t * c, 1.0 - t * t
        return jnp.where(col_valid > 0, z, NEG_INF), g

    def head_fwd(self, hn, w, col_valid, labels):
        """One vocabulary chunk: lse (B,T), target logit (B,T) (0 if the target is in
        another chunk) and u = (softmax_c ⊙ g) @ W_c (B,T,D), where g is the soft-cap's
        derivative; with soft-capping also g at the target (``target_g``, 0 elsewhere).
        The target's share of dhn, g_target · W[target], the host forms from one row."""
        z, g = self._chunk_logits(hn, w, col_valid)
        lse = jax.nn.logsumexp(z, axis=-1)
        onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)  # out of chunk: zeros
        p = jnp.exp(z - lse[..., None])
        out = {"lse": lse, "target_logit": (z * onehot).sum(-1)}
        if g is not None:
            p = p * g
            out["target_g"] = (g * onehot).sum(-1)
        out["u"] = jnp.einsum("btv,vd->btd", p, w)
        return out

    def head_wgrad(self, hn, w, col_valid, labels, lse, mask):
        z, g = self._chunk_logits(hn, w, col_valid)
        dz = jnp.exp(z - lse[..., None]) - jax.nn.one_hot(labels, z.shape[-1], dtype=z.dtype)
        if g is not None:
            dz = dz * g
        return jnp.einsum("btv,btd->vd", dz * mask[..., None], hn)

    def opt_update(self, which: str, p, g, leaves: dict):
        opt = self.opt[which]
        st0 = opt.init({"p": p})
        paths, treedef = jax.tree_util.tree_flatten_with_path(st0)
        names = [leaf_path(path) for path, _ in paths]
        state = jax.tree.unflatten(treedef, [leaves[n] for n in names])
        upd, new = opt.update({"p": g}, state, {"p": p})
        p2 = optax.apply_updates({"p": p}, upd)["p"]
        return p2, dict(zip(names, jax.tree.leaves(new)))

    # --- the signature table -------------------------------------------------------------
    def signatures(self, variants) -> dict[str, tuple]:
        """name -> (fn(**inputs) -> {output: array}, [TensorSpec inputs])."""
        t, d = self.seq_len, self.cfg.hidden_size
        f32 = "float32"
        out = {}
        attn_specs = self._attn_specs()
        attn_of = self._attn_of

        def wspecs(rels, prefix_shape):
            return [TensorSpec(W + r, tuple(self.shapes[prefix_shape + r]), f32) for r in rels]

        norm_fr = [n for n in self.norm_names if n not in self.trainable]
        norm_tr = [n for n in self.norm_names if n in self.trainable]
        vc = self.vocab_chunk
        for k in variants:
            hs = TensorSpec("h", (k, t, d), f32)
            dhs = TensorSpec("dh", (k, t, d), f32)
            for kind, names in self.kinds.items():
                fr, tr = names["frozen"], names["trainable"]
                specs = self._block_specs(kind, k)

                def fwd(kw, fr=fr, tr=tr):
                    w = {r: kw[W + r] for r in fr + tr}
                    return {"h": self.block_fwd(kw["h"], attn_of(kw), w)}

                def bwd(kw, fr=fr, tr=tr):
                    dh, gw = self.block_bwd(kw["h"], kw["dh"], attn_of(kw),
                                            {r: kw[W + r] for r in fr}, {r: kw[W + r] for r in tr})
                    return {"dh": dh, **{G + r: v for r, v in gw.items()}}
                out[B.block_fwd_sig(kind, k)] = (fwd, specs)
                out[B.block_bwd_sig(kind, k)] = (bwd, [hs, dhs, *specs[1:]])
                plan = self.residual_plan(kind, k)
                used = set(plan.inputs())
                out[B.block_fwd_save_sig(kind, k)] = (
                    lambda kw, kind=kind, k=k: self.block_fwd_save(kw, kind, k), specs)
                out[B.block_bwd_saved_sig(kind, k)] = (
                    lambda kw, kind=kind, k=k: self.block_bwd_saved(kw, kind, k),
                    [dhs, *plan.saved, *[s for s in specs if s.name in used]])
            ns = [TensorSpec(W + n, tuple(self.shapes[n]), f32) for n in self.norm_names]

            def nfwd(kw):
                return {"hn": self.norm_fwd(kw["h"], {n: kw[W + n] for n in self.norm_names})}

            def nbwd(kw):
                dh, gw = self.norm_bwd(kw["h"], kw["dhn"], {n: kw[W + n] for n in norm_fr},
                                       {n: kw[W + n] for n in norm_tr})
                return {"dh": dh, **{G + n: v for n, v in gw.items()}}
            out[B.norm_fwd_sig(k)] = (nfwd, [hs, *ns])
            out[B.norm_bwd_sig(k)] = (nbwd, [hs, TensorSpec("dhn", (k, t, d), f32), *ns])
            head_in = [TensorSpec("hn", (k, t, d), f32), TensorSpec("w", (vc, d), f32),
                       TensorSpec("col_valid", (vc,), f32), TensorSpec("labels", (k, t), "int32")]
            out[B.head_fwd_sig(k)] = (lambda kw: self.head_fwd(
                kw["hn"], kw["w"], kw["col_valid"], kw["labels"]), head_in)
            if self.head_trainable:
                out[B.head_wgrad_sig(k)] = (lambda kw: {"g": self.head_wgrad(
                    kw["hn"], kw["w"], kw["col_valid"], kw["labels"], kw["lse"], kw["mask"])},
                    head_in + [TensorSpec("lse", (k, t), f32), TensorSpec("mask", (k, t), f32)])
        out.update(self.decode_signatures(attn_specs, attn_of, wspecs))
        c = self.opt_chunk
        for which in self.opt_kinds():
            leaves = self.opt_leaves(which)

            def upd(kw, which=which, leaves=leaves):
                p, new = self.opt_update(which, kw["p"], kw["g"],
                                         {x.name: kw[S + x.name] for x in leaves})
                return {"p": p, **{S + n: v for n, v in new.items()}}
            out[B.opt_sig(which)] = (upd, [TensorSpec("p", (c,), f32), TensorSpec("g", (c,), f32),
                                           *[TensorSpec(S + x.name, x.shape, x.dtype)
                                             for x in leaves]])
        return out

    def decode_signatures(self, attn_specs, attn_of, wspecs) -> dict[str, tuple]:
        """Per block kind ``block_prefill`` (the padded window) and ``block_decode`` over a
        chunk of ``decode_chunk`` positions, and the final norm of one position (the host
        embeds and applies the head)."""
        t, d, c, f32 = self.seq_len, self.cfg.hidden_size, self.decode_chunk, "float32"
        cache = (1, t, self.cfg.num_kv_heads, self.cfg.head_dim)
        out = {}
        for kind, names in self.kinds.items():
            p0 = next(lay["prefix"] for lay in self.layers if lay["kind"] == kind)
            rels = names["frozen"] + names["trainable"]

            def prefill(kw, rels=rels):
                h, k, v = self.block_prefill(kw["h"], attn_of(kw), {r: kw[W + r] for r in rels})
                return {"h": h, "k": k, "v": v}

            def decode(kw, rels=rels):
                h, k, v = self.block_decode(kw["h"], kw["pos"], kw[B.K_CACHE], kw[B.V_CACHE],
                                            attn_of(kw), {r: kw[W + r] for r in rels})
                return {"h": h, "k": k, "v": v}
            out[B.block_prefill_sig(kind)] = (prefill, [TensorSpec("h", (1, t, d), f32),
                                                        *attn_specs, *wspecs(rels, p0)])
            out[B.block_decode_sig(kind)] = (decode, [
                TensorSpec("h", (1, c, d), f32), TensorSpec("pos", (), "int32"),
                TensorSpec(B.K_CACHE, cache, f32), TensorSpec(B.V_CACHE, cache, f32),
                *attn_specs, *wspecs(rels, p0)])
        ns = [TensorSpec(W + n, tuple(self.shapes[n]), f32) for n in self.norm_names]
        out[B.NORM_DECODE] = (lambda kw: {"hn": self.norm_fwd(
            kw["h"], {n: kw[W + n] for n in self.norm_names})},
            [TensorSpec("h", (1, 1, d), f32), *ns])
        return out

    def layout(self, store_dtype: str) -> B.ShardedLayout:
        """The manifest's ``sharded`` section (read by ``mobiletune.runtime.sharded``)."""
        return B.ShardedLayout(
            store_dtype=store_dtype, vocab_chunk=self.vocab_chunk, opt_chunk=self.opt_chunk,
            layers=tuple(B.LayerEntry(x["prefix"], x["kind"],
                                      None if x["attn"] is None else tuple(x["attn"]))
                         for x in self.layers),
            kinds={k: B.BlockKind(tuple(v["frozen"]), tuple(v["trainable"]))
                   for k, v in self.kinds.items()},
            embed=self.embed_name, head=self.head, norm=tuple(self.norm_names),
            positions=self.spec.positions, embed_scale=self.spec.embed_scale(self.cfg),
            clip_norm=self.optim.clip_norm, groups=tuple(self.groups),
            opt_leaves={w: self.opt_leaves(w) for w in self.opt_kinds()})

    def state_specs(self, store_dtype: str = "float32") -> tuple[TensorSpec, ...]:
        return self.layout(store_dtype).state_specs({t: self.shapes[t] for t in self.trainable})


def signature_meta(sm: ShardedModel, variants) -> list[Signature]:
    """The manifest's signature list, outputs from an abstract evaluation."""
    return table_meta(sm.signatures(variants))


def table_meta(table: dict) -> list[Signature]:
    """The manifest's entries for a signature table (name -> (fn, [TensorSpec])), outputs
    from an abstract evaluation."""
    out = []
    for name, (fn, specs) in table.items():
        args = {s.name: jax.ShapeDtypeStruct(s.shape, s.dtype) for s in specs}
        res = jax.eval_shape(fn, args)
        inputs = tuple(TensorSpec(s.name, signature_shape(s.shape), s.dtype) for s in specs)
        out.append(Signature(name, inputs, tuple(
            TensorSpec(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(res.items()))))
    return out


class JaxCalls:
    """The sharded signatures run by JAX (jit) behind the runtime's call interface: the
    reference the LiteRT program is checked against, and a fast way to test the host chain."""

    def __init__(self, sm: ShardedModel, variants):
        self.table = sm.signatures(variants)
        self._jit = {}

    def __call__(self, name: str, inputs: dict) -> dict:
        if name not in self._jit:
            self._jit[name] = jax.jit(self.table[name][0])
        out = self._jit[name]({k: jnp.asarray(v) for k, v in inputs.items()})
        return {k: np.asarray(v) for k, v in out.items()}
