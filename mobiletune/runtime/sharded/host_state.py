"""The trainable state of a sharded bundle, on the host: one flat float32 vector per
optimizer group (a layer's or the outer tensors, split by weight decay) for the parameters
and one for their accumulated gradients, the optimizer's leaves per group, and the scalars
(``acc_nll``, ``acc_count``, ``step``). The contract's tensor names are views into these
vectors, so ``get_state`` copies nothing (a full fine-tune's state is 4× the model). The
vectors live in RAM or in a memory-mapped file (``state_store``; ``store.release`` drops a
shard's pages once it is used)."""

from __future__ import annotations

import math

import numpy as np

from mobiletune.io import safetensors as st
from mobiletune.runtime import bundle as B
from mobiletune.runtime.runner import check_state
from mobiletune.runtime.sharded import state_store


def _vectors(lay: B.ShardedLayout, g: B.OptGroup):
    """(shape, dtype) of a group's vectors: parameters, gradients, optimizer leaves."""
    yield (g.size,), np.float32
    yield (g.size,), np.float32
    for leaf in lay.opt_leaves[g.optimizer]:
        yield lay.opt_state_shape(leaf, g), leaf.dtype


def state_bytes(manifest: B.Manifest) -> int:
    """What the groups' vectors take (in a file store, page-aligned)."""
    lay = manifest.sharded
    return state_store.nbytes(v for g in lay.groups for v in _vectors(lay, g))


class GroupState:
    def __init__(self, lay: B.ShardedLayout, g: B.OptGroup, shapes: dict, store):
        self.group, self.size = g, g.size
        (ps, pd), (gs, gd), *leaves = _vectors(lay, g)
        self.p, self.acc = store.alloc(ps, pd), store.alloc(gs, gd)
        self.views, self.acc_views, o = {}, {}, 0
        for t in g.tensors:
            n = math.prod(shapes[t])
            self.views[t] = self.p[o:o + n].reshape(shapes[t])
            self.acc_views[t] = self.acc[o:o + n].reshape(shapes[t])
            o += n
        self.opt = {leaf.name: store.alloc(s, d)
                    for leaf, (s, d) in zip(lay.opt_leaves[g.optimizer], leaves)}


class HostState:
    def __init__(self, manifest: B.Manifest, store_dir=None, store: str = "auto",
                 memory_budget_mb: float | None = None):
        """The state in RAM, or streamed from a file under ``store_dir`` when
        ``state_store.choose`` says so (``store``: auto | ram | disk)."""
        self.manifest, lay = manifest, manifest.sharded
        need = state_bytes(manifest)
        self.store = (state_store.FileStore(store_dir, need)
                      if state_store.choose(need, store, memory_budget_mb, store_dir)
                      else state_store.RamStore())
        self.shapes = {k: tuple(s.shape) for k, s in
                       ((s.name[len(B.TRAINABLE):], s) for s in manifest.state
                        if s.name.startswith(B.TRAINABLE))}
        self.groups = [GroupState(lay, g, self.shapes, self.store) for g in lay.groups]
        self.tensor = {t: g.views[t] for g in self.groups for t in g.views}
        self.grad = {t: g.acc_views[t] for g in self.groups for t in g.acc_views}
        self.acc_nll = np.zeros((), np.float32)
        self.acc_count = np.zeros((), np.float32)
        self.step = np.zeros((), np.int32)

    def views(self) -> dict:
        out = {B.ACC_NLL: self.acc_nll, B.ACC_COUNT: self.acc_count, B.STEP: self.step}
        for g in self.groups:
            out.update({B.trainable_name(t): v for t, v in g.views.items()})
            out.update({B.acc_name(t): v for t, v in g.acc_views.items()})
            out.update({B.opt_name(g.group.name, n): v for n, v in g.opt.items()})
        return out

    def get_state(self) -> dict[str, np.ndarray]:
        """Read-only views of the live state; they change with the next step, so write
        them out before training on."""
        out = {}
        for k, v in self.views().items():
            out[k] = v.view()
            out[k].flags.writeable = False
        return out

    def set_state(self, state: dict, zeros_for_missing: bool = False) -> None:
        views = self.views()
        for name, a in check_state(self.manifest, state, zeros_for_missing).items():
            views[name][...] = a
            self.store.release(views[name])

    def load(self, path, zeros_for_missing: bool = False) -> None:
        """``set_state`` from a safetensors file, read tensor by tensor straight into the
        state (nothing of the file stays resident)."""
        held = {n: np.broadcast_to(np.zeros((), d), s) for n, (s, d) in st.shapes(path).items()}
        names = check_state(self.manifest, held, zeros_for_missing)
        views = self.views()
        st.read_into(path, {n: views[n] for n in names if n in held}, after=self.store.release)
        for n in names:
            if n not in held:
                views[n][...] = 0
                self.store.release(views[n])

    def release_tensors(self, names) -> None:
        """Drop the pages of these trainable tensors and their gradients."""
        self.store.release(*(a for n in names if n in self.tensor
                             for a in (self.tensor[n], self.grad[n])))
