"""The side network's training step as pure functions (the ``train.step`` semantics for a
side network): ``accumulate`` adds one micro-batch's summed-NLL gradient and token count,
``apply`` divides by the count and runs the recipe's optimizer. The loss is the project's
chunked cross-entropy through the frozen backbone's final norm and head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mobiletune import families
from mobiletune.families.config import ModelConfig
from mobiletune.models import side as SD
from mobiletune.runtime.side.config import SideConfig
from mobiletune.train.loss import nll_sum
from mobiletune.train.step import Accum, TrainState


@dataclass(frozen=True, eq=False)
class SideSteps:
    cfg: ModelConfig
    scfg: SideConfig
    optimizer: optax.GradientTransformation
    loss_chunk: int = 64

    def nll(self, side, base, batch, taps, h_last):
        """(summed NLL, counted tokens) of a micro-batch given the phone's activations."""
        hn = SD.side_hidden(side, base, self.cfg, self.scfg, batch["inputs"], taps, h_last)
        w = base[families.spec(self.cfg.family).output_name(self.cfg)]
        mask = batch["loss_mask"].astype(jnp.float32)
        nll = nll_sum(hn, w, batch["targets"], mask, self.cfg.final_logit_softcapping,
                      self.loss_chunk, False, self.cfg.matmul)
        return nll, mask.sum()

    def init(self, side) -> TrainState:
        return TrainState(side, self.optimizer.init(side), jnp.zeros((), jnp.int32))

    def zero_accum(self, side) -> Accum:
        return Accum(jax.tree.map(jnp.zeros_like, side), jnp.zeros((), jnp.float32),
                     jnp.zeros((), jnp.float32))

    def accumulate(self, acc: Accum, side, base, batch, taps, h_last) -> Accum:
        (nll, count), grads = jax.value_and_grad(
            lambda s: self.nll(s, base, batch, taps, h_last), has_aux=True)(side)
        return Accum(jax.tree.map(jnp.add, acc.grads, grads), acc.nll + nll, acc.count + count)

    def apply(self, state: TrainState, acc: Accum):
        denom = jnp.maximum(acc.count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, acc.grads)
        updates, opt = self.optimizer.update(grads, state.opt_state, state.trainable)
        side = optax.apply_updates(state.trainable, updates)
        return TrainState(side, opt, state.step + 1), acc.nll / denom

    def jitted(self) -> Any:
        return jax.jit(self.accumulate), jax.jit(self.apply)
