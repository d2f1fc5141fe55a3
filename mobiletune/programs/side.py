"""The phone's program of a side-tuning bundle, as pure JAX functions (``export/`` traces
them): the frozen backbone's ``block_fwd`` / ``norm_fwd`` per block (the sharded program's
own signatures: weights are inputs, streamed from the weight store) and, for generation,
the side network's ``side_in`` / ``side_layer`` / ``side_out`` with its weights as inputs
(``mobiletune.models.side`` is the math); with ``SideConfig.cut`` the block chain alone
(the phone folds the trained adapter into the top blocks' weights). No backward pass, no
optimizer, no head: the phone only runs forward; the server trains the side network.
"""

from __future__ import annotations

import jax.numpy as jnp

from mobiletune import families
from mobiletune.models import side as SD
from mobiletune.programs.sharded import NO_WINDOW, ShardedModel, signature_meta
from mobiletune.runtime import bundle as B
from mobiletune.runtime.bundle import TensorSpec, W
from mobiletune.runtime.side.config import SideConfig
from mobiletune.train.optim import OptimConfig


class SideProgram:
    def __init__(self, cfg, scfg: SideConfig, frozen_shapes: dict, seq_len: int,
                 vocab_chunk: int = 4096):
        self.cfg, self.scfg, self.seq_len = cfg, scfg, seq_len
        self.backbone = ShardedModel(cfg, None, OptimConfig(), {}, frozen_shapes, seq_len,
                                     vocab_chunk=vocab_chunk)
        self.sc = SD.side_config(cfg, scfg)
        self.tapped = scfg.tapped(cfg.num_layers)
        self.tap_width = scfg.tap_width(cfg.hidden_size)
        self.shapes = SD.side_shapes(cfg, scfg)
        spec = families.spec(cfg.family)
        self.attn = None if spec.attention_kind is None or scfg.cut is not None else tuple(
            (float(t), float(f), int(w or NO_WINDOW))
            for t, f, w in (spec.attention_kind(self.sc, j) for j in range(self.sc.num_layers)))

    def _layer_rel(self) -> list[str]:
        p = B.side_layer_prefix(0)
        return sorted(k[len(p):] for k in self.shapes if k.startswith(p))

    def signatures(self, variants) -> dict[str, tuple]:
        """name -> (fn(inputs) -> outputs, [TensorSpec inputs])."""
        keep = {B.norm_fwd_sig(1)} | {B.block_fwd_sig(x["kind"], k)
                                      for x in self.backbone.layers for k in variants}
        out = {n: v for n, v in self.backbone.signatures(tuple(sorted(set(variants) | {1}))).items()
               if n in keep}
        if self.scfg.cut is not None:   # generation folds the adapter into the top blocks' weights
            return out
        t, d, ds, f32 = self.seq_len, self.cfg.hidden_size, self.sc.hidden_size, "float32"
        emb_down = B.SIDE_EMBED_DOWN
        out[B.side_in_sig(1)] = (
            lambda kw: {"s": SD.side_in(kw[W + emb_down], kw["emb"], self.cfg.matmul)},
            [TensorSpec("emb", (1, t, d), f32),
             TensorSpec(W + emb_down, self.shapes[emb_down], f32)])
        rel = self._layer_rel()
        attn_specs = [] if self.attn is None else [
            TensorSpec("rope_theta", (), f32), TensorSpec("rope_factor", (), f32),
            TensorSpec("window", (), "int32")]

        def layer(kw):
            attn = None if self.attn is None else (kw["rope_theta"], kw["rope_factor"],
                                                   kw["window"])
            positions = jnp.arange(t, dtype=jnp.int32)
            return {"s": SD.side_layer({r: kw[W + r] for r in rel}, self.sc, 0, kw["s"],
                                       kw["tap"], positions, attn)}
        p0 = B.side_layer_prefix(0)
        out[B.side_layer_sig(1)] = (layer, [
            TensorSpec("s", (1, t, ds), f32), TensorSpec("tap", (1, t, self.tap_width), f32),
            *attn_specs, *[TensorSpec(W + r, self.shapes[p0 + r], f32) for r in rel]])
        norm = sorted(n for n in self.shapes if n.startswith(B.SIDE_NORM))
        up = B.SIDE_UP

        def side_out(kw):
            nd = {n[len(B.SIDE_NORM):]: kw[W + n] for n in norm}
            return {"hn": SD.side_out(nd, kw[W + up], self.sc, kw["hn"], kw["s"])}
        out[B.side_out_sig(1)] = (side_out, [
            TensorSpec("hn", (1, t, d), f32), TensorSpec("s", (1, t, ds), f32),
            *[TensorSpec(W + n, self.shapes[n], f32) for n in norm],
            TensorSpec(W + up, self.shapes[up], f32)])
        return out

    def layout(self, store_dtype: str) -> tuple[B.ShardedLayout, B.SideLayout]:
        lay = self.backbone.layout(store_dtype)
        side = B.SideLayout(self.scfg.to_dict(), self.tapped, self.tap_width, self.sc.to_dict(),
                            self.attn, dict(self.shapes))
        return lay, side

    def signature_meta(self, variants):
        return signature_meta(self, variants)
