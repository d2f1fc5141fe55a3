"""Run a sharded training bundle (``mobiletune.programs.sharded`` is its JAX reference):
``chain`` runs the per-block signatures for a micro-batch, ``host_state`` holds the
trainable state as flat vectors per optimizer group (in RAM or streamed through the
memory-mapped ``state_store``), ``optimizer`` applies the recipe's optimizer chunk by
chunk, ``weights`` streams the frozen weights from disk."""

from mobiletune.runtime.sharded.chain import ShardedRunner  # noqa: F401
