"""The training step as pure functions of pytrees — the exact functions the exporter later
traces into LiteRT signatures (``train_step``, ``accumulate``, ``apply``, ``eval``).

The loss of an optimizer step is the summed next-token NLL over every counted token of the
effective batch divided by the number of those tokens. ``accumulate`` adds one
micro-batch's summed-NLL gradient and token count into an accumulator; ``apply`` divides
by the count and runs the optimizer. So k micro-batches of b examples give the same update
as one batch of k*b (up to float summation order), whatever the padding.

Trainable vs frozen is a partition of the flat param dict (LoRA: the adapter vs the base;
full fine-tuning: everything vs nothing); gradients exist for the trainable part only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mobiletune import families
from mobiletune.models.config import ModelConfig
from mobiletune.models.lora import LoraConfig
from mobiletune.train.loss import batch_nll


class TrainState(NamedTuple):
    trainable: dict
    opt_state: Any
    step: jax.Array          # int32 optimizer steps taken


class Accum(NamedTuple):
    grads: dict              # summed-NLL gradients, same tree as trainable
    nll: jax.Array           # summed NLL
    count: jax.Array         # counted tokens


def step_key(seed: int, step, micro: int = 0):
    """Dropout key of (optimizer step, micro-batch index): a resumed run draws the same."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), micro)


@dataclass(frozen=True, eq=False)
class Steps:
    cfg: ModelConfig
    lcfg: LoraConfig | None
    optimizer: optax.GradientTransformation
    loss_chunk: int = 64

    def _lora(self, key, train):
        return None if self.lcfg is None else self.lcfg.ctx(key, train)

    def loss_and_grads(self, trainable, frozen, batch, key):
        def f(tr):
            nll, count = batch_nll({**frozen, **tr}, self.cfg, batch, self._lora(key, True),
                                   self.loss_chunk, head_trainable=self._head_trainable(tr))
            return nll, count
        (nll, count), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        return nll, count, grads

    def _head_trainable(self, trainable) -> bool:
        spec = families.spec(self.cfg.family)
        return spec.head in trainable or spec.embed in trainable

    def init(self, trainable) -> TrainState:
        return TrainState(trainable, self.optimizer.init(trainable), jnp.zeros((), jnp.int32))

    def zero_accum(self, trainable) -> Accum:
        return Accum(jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
                     jnp.zeros((), jnp.float32))

    def accumulate(self, acc: Accum, trainable, frozen, batch, key) -> Accum:
        nll, count, grads = self.loss_and_grads(trainable, frozen, batch, key)
        return Accum(jax.tree.map(jnp.add, acc.grads, grads), acc.nll + nll, acc.count + count)

    def apply(self, state: TrainState, acc: Accum):
        """(new state, mean loss of the effective batch)."""
        denom = jnp.maximum(acc.count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, acc.grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        return TrainState(trainable, opt_state, state.step + 1), acc.nll / denom

    def train_step(self, state: TrainState, frozen, batch, key):
        """One optimizer step on one batch: (new state, loss)."""
        acc = self.accumulate(self.zero_accum(state.trainable), state.trainable, frozen, batch, key)
        return self.apply(state, acc)

    def eval_nll(self, trainable, frozen, batch):
        return batch_nll({**frozen, **trainable}, self.cfg, batch, self._lora(None, False),
                         self.loss_chunk)

    def jitted(self) -> "JitSteps":
        """The step functions compiled. ``accumulate`` donates its accumulator, ``apply``
        and ``train_step`` their ``TrainState``: XLA updates those buffers in place, so a
        state passed in is spent (pass each state once; ``init`` a copy to run two from the
        same params). Without the donation every step allocated a second copy of the
        params and optimizer moments: SmolLM2-135M full fine-tuning peaked at 6.4 GB
        instead of 3.5 GB (benchmarks/README.md)."""
        return JitSteps(jax.jit(self.accumulate, donate_argnums=0),
                        jax.jit(self.apply, donate_argnums=0),
                        jax.jit(self.train_step, donate_argnums=0), jax.jit(self.eval_nll))


class JitSteps(NamedTuple):
    accumulate: Any
    apply: Any
    train_step: Any
    eval_nll: Any
