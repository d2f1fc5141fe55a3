"""KV-cache decoding of a monolithic bundle layer by layer over its weights as constants
(schema 7), with the sharded bundle's decoder (``runtime.sharded.decode``).

The program's own ``decode`` reads every weight from a resource variable through LiteRT's
built-in kernel, transposing each one first (SmolLM2-135M: 8.8-9.2 tokens/s). Here each
layer runs its ``decode_<kind>.skel`` over the layer's weights (the state's trainable
tensors over the base file's frozen ones) as constants, which XNNPACK packs once, as for a
sharded bundle; the program contributes ``norm_decode``, and a long prompt's one pass
over the padded window (its ``prefill``). Memory: the decoder's copy of the model (packed
constants, the head in float32) on top of the program's variables.
"""

from __future__ import annotations

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.monolithic import program_prefill
from mobiletune.runtime.runner import HostCache, load_tensors
from mobiletune.runtime.sharded.chain import embed_rows_at, layer_inputs
from mobiletune.runtime.sharded.constant_decode import drop_mapped_pages
from mobiletune.runtime.sharded.decode import ShardedDecoder


class MonolithicSource:
    """What the decoder reads, from a monolithic runner: the layout ``Manifest.decoding``,
    the program's signatures, and the weights by HF name. The weights are held while the
    decoder is built; ``keep_embedding`` then drops all but the embedding's tables."""

    def __init__(self, runner):
        m = runner.manifest
        self.manifest, self.lay, self.dir, self.call = m, m.decoding, runner.dir, runner.call
        self.softcap = m.model.get("final_logit_softcapping")
        self.w = B.trainable_part(runner.get_state())
        if m.frozen:                                  # memory-mapped; pages read as needed
            base = load_tensors(self.dir / B.BASE, mmap=True)
            self.w.update({k[len(B.FROZEN):]: v for k, v in base.items()})

    def weight(self, name: str) -> np.ndarray:
        return self.w[name]

    def layer_inputs(self, i: int) -> dict:
        return layer_inputs(self.lay, i, self.weight)

    def embed_at(self, ids, pos: int) -> np.ndarray:
        p = self.lay.positions
        return embed_rows_at(self.lay, lambda n, at: self.w[n][at],
                             p and len(self.w[p]), ids, pos)

    def release_pages(self) -> None:
        """The base file's pages read so far leave the resident set (clean pages of the
        map; a later read faults them back): the decoder's build holds about one layer of
        them, not the model."""
        if self.manifest.frozen:
            drop_mapped_pages((self.dir / B.BASE).resolve())   # as /proc/self/maps names it

    def keep_embedding(self, head: np.ndarray) -> None:
        """Drop every weight but the embedding's tables, as copies (a view would keep the
        base file's whole map, and its pages read so far, resident); a tied embedding is
        the decoder's float32 ``head``."""
        lay = self.lay
        self.w = {n: head if n == lay.head else np.array(self.w[n])
                  for n in (lay.embed, lay.positions) if n}


class MonolithicDecoder(ShardedDecoder):
    """``ShardedDecoder`` over a ``MonolithicSource``; a long prompt goes through the
    program's ``prefill`` (the weights there are the program's variables: the same state)."""

    def __init__(self, runner):
        src = MonolithicSource(runner)
        super().__init__(src)
        src.keep_embedding(self.head)

    def _window(self, tokens) -> tuple[np.ndarray, HostCache]:
        return program_prefill(self.r.call, self.m, tokens)
