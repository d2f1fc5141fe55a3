"""The trainable state of a sharded bundle, on the host: one flat float32 vector per
optimizer group (a layer's or the outer tensors, split by weight decay) for the parameters
and one for their accumulated gradients, the optimizer's leaves per group, and the scalars
(``acc_nll``, ``acc_count``, ``step``). The contract's tensor names are views into these
vectors, so ``get_state`` copies nothing (a full fine-tune's state is 4× the model)."""

from __future__ import annotations

import math

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.runner import check_state


class GroupState:
    def __init__(self, lay: B.ShardedLayout, g: B.OptGroup, shapes: dict):
        self.group, self.size = g, g.size
        self.p = np.zeros(g.size, np.float32)
        self.acc = np.zeros(g.size, np.float32)
        self.views, self.acc_views, o = {}, {}, 0
        for t in g.tensors:
            n = math.prod(shapes[t])
            self.views[t] = self.p[o:o + n].reshape(shapes[t])
            self.acc_views[t] = self.acc[o:o + n].reshape(shapes[t])
            o += n
        self.opt = {leaf.name: np.zeros(lay.opt_state_shape(leaf, g), leaf.dtype)
                    for leaf in lay.opt_leaves[g.optimizer]}


class HostState:
    def __init__(self, manifest: B.Manifest):
        self.manifest, lay = manifest, manifest.sharded
        self.shapes = {k: tuple(s.shape) for k, s in
                       ((s.name[len(B.TRAINABLE):], s) for s in manifest.state
                        if s.name.startswith(B.TRAINABLE))}
        self.groups = [GroupState(lay, g, self.shapes) for g in lay.groups]
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

    def zero_accumulators(self) -> None:
        for g in self.groups:
            g.acc[...] = 0
        self.acc_nll[...] = 0
        self.acc_count[...] = 0
