"""What a recipe trains, for the desktop trainer and both exporters alike: the partition of
the model's params into trainable and frozen, and the step functions."""

from __future__ import annotations

import ctypes

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune.models import lora
from mobiletune.models.config import ModelConfig
from mobiletune.train.optim import make_optimizer
from mobiletune.train.recipe import Recipe
from mobiletune.train.step import Steps


def split_params(recipe: Recipe, cfg: ModelConfig, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen): LoRA trains a fresh adapter (A random from the recipe's seed,
    B = 0) over every param frozen; full fine-tuning trains every param. The params are
    passed through as given (numpy stays numpy); the adapter comes back as numpy."""
    if recipe.lora is None:
        return params, {}
    adapter = lora.init_lora(cfg, recipe.lora, jax.random.PRNGKey(recipe.seed))
    return {k: np.asarray(v) for k, v in adapter.items()}, params


def make_steps(recipe: Recipe, cfg: ModelConfig) -> Steps:
    return Steps(cfg, recipe.lora.resolved(cfg) if recipe.lora else None,
                 make_optimizer(recipe.optim_config(), cfg.family), recipe.loss_chunk)


def build_steps(recipe: Recipe, m) -> tuple[Steps, dict, dict]:
    """(step functions, initial trainable params, frozen params) as jax arrays, for a
    recipe and a ``LoadedModel``; consumes ``m.params`` (the numpy copy is dropped)."""
    params = {k: jnp.asarray(v) for k, v in m.params.items()}
    m.params = None
    trim_heap()
    trainable, frozen = split_params(recipe, m.cfg, params)
    return make_steps(recipe, m.cfg), {k: jnp.asarray(v) for k, v in trainable.items()}, frozen


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing where
    there is none). The numpy copies of the params that ``build_steps`` drops were mostly
    allocated below glibc's mmap threshold, which rises as large blocks are freed, so
    freeing them left their pages resident: Qwen 2.5 0.5B LoRA b4×s128, the desktop
    step's peak RSS 5121 → 4287 MB (benchmarks/README.md, "The desktop trainer")."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
