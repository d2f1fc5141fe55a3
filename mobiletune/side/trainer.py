"""The server's side-network trainer: micro-batches in strict sequence order, accumulated to
the recipe's effective batch, one optimizer step each time it is full; an atomic
checkpoint (side weights, optimizer state, the ``trained_through`` watermark and the
phone's data cursor) every ``checkpoint_every`` steps and at the end.

Resuming replays what is above the watermark, so a killed server — at any moment —
ends with the same side weights as an uninterrupted run (on CPU, where XLA is
deterministic): the micro-batches, their order and their grouping into steps are the same.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.formats.loading import load_model
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.models import side as SD
from mobiletune.programs.monolithic import leaf_path
from mobiletune.runtime.metrics import MetricsLog, peak_rss_mb
from mobiletune.runtime.side import protocol as P
from mobiletune.runtime.side.quantize import dequantize
from mobiletune.runtime.state_checkpoints import Checkpoints
from mobiletune.side.steps import SideSteps
from mobiletune.train.optim import make_optimizer
from mobiletune.train.recipe import Recipe

SIDE_FILE = "side.safetensors"
SIDE_CONFIG = "side_config.json"   # the SideConfig beside the weights (for generate --side)
OPTIM = "optim."   # checkpoint names of the optimizer's leaves (optax tree paths)


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def decode(tensors: dict, meta: dict, cfg, scfg, n_taps: int, tap_width: int):
    """(batch dict, taps, h_last) of a checked payload, dequantized to float32."""
    p = scfg.precision
    taps = [dequantize({k.split(".")[-1]: v for k, v in tensors.items()
                        if k.startswith(P.tap_name(j, ""))}, p, tap_width) for j in range(n_taps)]
    last = dequantize({k.split(".")[-1]: v for k, v in tensors.items()
                       if k.startswith(P.last_name(""))}, scfg.last_precision, cfg.hidden_size)
    batch = {k: tensors[k] for k in ("inputs", "targets", "loss_mask")}
    return batch, taps, last


class SideTrainer:
    def __init__(self, recipe: Recipe, out, checkpoint_every: int = 10, log=info):
        if recipe.side is None:
            raise MobiletuneError(f"recipe {recipe.name!r}: no side=SideConfig(...) section")
        self.recipe, self.out, self.log = recipe, Path(out), log
        self.out.mkdir(parents=True, exist_ok=True)
        m = load_model(recipe.model, seed=recipe.seed)
        self.cfg, self.scfg = m.cfg, recipe.side
        self.base = {k: jnp.asarray(v) for k, v in m.params.items()}
        self.tapped = self.scfg.tapped(self.cfg.num_layers)
        self.tap_width = self.scfg.tap_width(self.cfg.hidden_size)
        self.steps = SideSteps(self.cfg, self.scfg, make_optimizer(recipe.optim_config(),
                                                                   self.cfg.family),
                               recipe.loss_chunk)
        self._acc, self._apply = self.steps.jitted()
        side0 = SD.init_side(self.cfg, self.scfg, jax.random.PRNGKey(recipe.seed))
        self.state = self.steps.init({k: jnp.asarray(v) for k, v in side0.items()})
        self.acc = self.steps.zero_accum(self.state.trainable)
        self.done = 0                 # examples accumulated into the current step
        self.consumed = 0             # the last seq accumulated
        self.trained_through = 0      # the last seq of the last step applied
        self.cursor = None            # the phone's data cursor after ``trained_through``
        self.checkpoint_every = checkpoint_every
        self.ckpts = Checkpoints(self.out / "checkpoints", log=log)
        self.tokens, self.t0 = 0.0, time.perf_counter()
        got = self.ckpts.latest()
        if got is not None:
            self._restore(*got)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", upto=int(self.state.step))
        atomic.write_text(self.out / SIDE_CONFIG, json.dumps(self.scfg.to_dict(), indent=1) + "\n")
        if got is None:
            self.write_side()

    # --- state -------------------------------------------------------------------------------
    def _named_state(self) -> dict:
        paths, _ = jax.tree_util.tree_flatten_with_path(self.state.opt_state)
        out = {k: np.asarray(v) for k, v in self.state.trainable.items()}
        out.update({OPTIM + leaf_path(p): np.asarray(v) for p, v in paths})
        return out

    def _restore(self, step: int, named: dict, meta: dict) -> None:
        paths, treedef = jax.tree_util.tree_flatten_with_path(self.state.opt_state)
        missing = [n for n in [*self.state.trainable, *(OPTIM + leaf_path(p) for p, _ in paths)]
                   if n not in named]
        if missing:
            raise MobiletuneError(f"{self.ckpts.dir}: checkpoint step {step} lacks {missing[0]!r} "
                                  f"(a different recipe?)")
        side = {k: jnp.asarray(named[k]) for k in self.state.trainable}
        opt = jax.tree.unflatten(treedef, [jnp.asarray(named[OPTIM + leaf_path(p)])
                                           for p, _ in paths])
        self.state = self.state._replace(trainable=side, opt_state=opt,
                                         step=jnp.asarray(step, jnp.int32))
        self.acc = self.steps.zero_accum(side)
        self.trained_through = self.consumed = int(meta["trained_through"])
        self.cursor = meta.get("cursor")
        self.log(f"side trainer: resumed at step {step} (trained through seq "
                 f"{self.trained_through})")

    def checkpoint(self) -> None:
        self.ckpts.save(int(self.state.step), self._named_state(),
                        {"trained_through": self.trained_through, "cursor": self.cursor,
                         "recipe": self.recipe.fingerprint()})
        self.write_side()

    def side_tensors(self) -> dict:
        return {k: np.asarray(v) for k, v in self.state.trainable.items()}

    def write_side(self) -> None:
        """``side.safetensors``: the current side weights, what ``GET .../side`` serves."""
        st.save(self.out / SIDE_FILE, self.side_tensors(),
                meta={"step": int(self.state.step), "recipe": self.recipe.fingerprint(),
                      "side": P.side_config_hash(self.scfg.to_dict())})

    # --- training -----------------------------------------------------------------------------
    def train(self, seq: int, tensors: dict, meta: dict) -> bool:
        """Accumulate micro-batch ``seq`` (the next one in order); True when it completed an
        optimizer step."""
        if seq != self.consumed + 1:
            raise MobiletuneError(f"side trainer: got seq {seq}, expected {self.consumed + 1}")
        batch, taps, last = decode(tensors, meta, self.cfg, self.scfg, len(self.tapped),
                                   self.tap_width)
        k = int(meta["k"])
        self.acc = self._acc(self.acc, self.state.trainable, self.base,
                             {n: jnp.asarray(v) for n, v in batch.items()},
                             [jnp.asarray(t) for t in taps], jnp.asarray(last))
        self.consumed, self.done = seq, self.done + k
        self.tokens += float(batch["loss_mask"].sum())
        if self.done < self.recipe.batch_size:
            return False
        if self.done > self.recipe.batch_size:
            raise MobiletuneError(f"side trainer: seq {seq} overfills the step ({self.done} "
                                  f"examples, the effective batch is {self.recipe.batch_size})")
        self.state, loss = self._apply(self.state, self.acc)
        self.acc = self.steps.zero_accum(self.state.trainable)
        self.done, self.trained_through = 0, seq
        self.cursor = json.loads(meta["cursor"])
        step, loss = int(self.state.step), float(loss)
        if not math.isfinite(loss):
            raise MobiletuneError(f"side trainer: step {step}: loss is {loss}; lower optim.lr?")
        self.metrics.write({"step": step, "loss": loss, "tokens": self.tokens,
                            "seconds": time.perf_counter() - self.t0, "trained_through": seq,
                            "unix_time": time.time(),
                            "peak_rss_mb": round(peak_rss_mb(), 1)})
        self.tokens, self.t0 = 0.0, time.perf_counter()
        if step % self.checkpoint_every == 0:
            self.checkpoint()
        return True
