"""Optimizers as data: ``OptimConfig`` -> an optax ``GradientTransformation``.

AdamW / SGD (momentum) / Adafactor, linear warmup then cosine, linear or constant decay,
global-norm clipping, and a weight-decay mask that by default spares norms, biases and
embeddings (the usual practice; PEFT/transformers' Trainer skip biases and LayerNorm), by
the family spec's ``no_decay`` rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import optax

from mobiletune import families
from mobiletune.errors import MobiletuneError


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"             # adamw | sgd | adafactor
    lr: float = 1e-4
    schedule: str = "cosine"        # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    total_steps: int = 1000         # the schedule's horizon; the trainer sets it to `steps`
    min_lr_ratio: float = 0.0       # final lr = lr * min_lr_ratio
    weight_decay: float = 0.0
    decay_norms_biases_embeddings: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0           # sgd
    clip_norm: float | None = 1.0   # global-norm clipping; None disables

    def __post_init__(self):
        if self.name not in ("adamw", "sgd", "adafactor"):
            raise MobiletuneError(f"optim.name={self.name!r}: expected adamw, sgd or adafactor")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise MobiletuneError(f"optim.schedule={self.schedule!r}: expected cosine, linear "
                                  f"or constant")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def schedule(c: OptimConfig) -> optax.Schedule:
    decay_steps = max(1, c.total_steps - c.warmup_steps)
    end = c.lr * c.min_lr_ratio
    if c.schedule == "cosine":
        after = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.min_lr_ratio)
    elif c.schedule == "linear":
        after = optax.linear_schedule(c.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(c.lr)
    if c.warmup_steps <= 0:
        return after
    warm = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
    return optax.join_schedules([warm, after], [c.warmup_steps])


def decay_mask(params: dict, c: OptimConfig, family: str | None = None) -> dict:
    """True where weight decay applies, by HF name: not where ``family``'s spec spares it
    (``FamilySpec.no_decay``), or with no family given, where any family's spec does."""
    if c.decay_norms_biases_embeddings:
        return {k: True for k in params}
    specs = [families.spec(family)] if family is not None else list(families.SPECS.values())
    return {k: not any(s.no_decay(k) for s in specs) for k in params}


def make_optimizer(c: OptimConfig, family: str | None = None) -> optax.GradientTransformation:
    """The optimizer ``c`` describes; ``family`` picks the weight-decay rule (``decay_mask``)."""
    sched = schedule(c)
    mask = lambda p: decay_mask(p, c, family)  # noqa: E731
    if c.name == "adamw":
        opt = optax.adamw(sched, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                          mask=mask)
    elif c.name == "sgd":
        opt = optax.sgd(sched, momentum=c.momentum or None)
        if c.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(c.weight_decay, mask=mask), opt)
    else:
        opt = optax.adafactor(sched, weight_decay_rate=c.weight_decay or None,
                              weight_decay_mask=mask)
    if c.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(c.clip_norm), opt)
    return opt
