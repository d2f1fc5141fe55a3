"""Training checkpoints with orbax-checkpoint: the train state (trainable params, optimizer
state, step) as a pytree, and the data position + recipe fingerprint as JSON. Orbax writes
each step into a temporary directory and renames it when complete, so a process killed at
any moment leaves the previous checkpoint intact; we keep the last two."""

from __future__ import annotations

import logging
from pathlib import Path

import jax

from mobiletune.errors import CheckpointError

logging.getLogger("absl").setLevel(logging.ERROR)


class Manager:
    def __init__(self, directory: Path, keep: int = 2):
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.mgr = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, state, data_state: dict, fingerprint: str) -> None:
        ocp = self.ocp
        self.mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()),
            meta=ocp.args.JsonSave({"data": data_state, "recipe": fingerprint, "step": step})))
        self.mgr.wait_until_finished()

    def restore(self, like):
        """(state shaped like ``like``, data position, recipe fingerprint) of the latest step."""
        ocp = self.ocp
        step = self.mgr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like._asdict())
        try:
            r = self.mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged or mismatched trees
            raise CheckpointError(f"checkpoint step {step}: cannot restore ({e})") from None
        state = type(like)(**r.state)
        state = state._replace(opt_state=jax.tree.unflatten(
            jax.tree.structure(like.opt_state), jax.tree.leaves(state.opt_state)))
        return state, r.meta["data"], r.meta["recipe"]

    def close(self) -> None:
        self.mgr.close()
