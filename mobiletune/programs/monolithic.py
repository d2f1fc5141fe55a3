"""The bundle's signatures as pure JAX functions over a flat, named state.

This is the JAX reference of a training bundle: ``export/`` traces exactly these functions
into LiteRT, and the tests run them side by side with the LiteRT interpreter. State names
are the contract's (``mobiletune.runtime.bundle``); the optimizer step count is the state's
explicit ``step`` tensor.

Every function takes ``(state, frozen, *inputs)`` and returns ``(state updates, outputs)``:
dicts keyed by contract names, so the TF module assigns the updates to its variables.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mobiletune import models
from mobiletune.errors import MobiletuneError
from mobiletune.runtime import bundle as B
from mobiletune.runtime.bundle import TensorSpec
from mobiletune.train.step import Accum, Steps, TrainState


def _key_str(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_path(path) -> str:
    """An optax state leaf's tree path as a name, e.g. ``1/0/mu`` (for contract names)."""
    return "/".join(_key_str(k) for k in path)


class Program:
    def __init__(self, steps: Steps, trainable: dict, frozen: dict, seq_len: int):
        if steps.lcfg is not None and steps.lcfg.dropout > 0:
            raise MobiletuneError(f"lora.dropout={steps.lcfg.dropout}: bundles train without "
                                  f"dropout (LiteRT has no random ops); --set lora.dropout=0")
        self.steps, self.seq_len, self.cfg = steps, seq_len, steps.cfg
        self.trainable_names = sorted(trainable)
        self.frozen_names = sorted(frozen)
        opt0 = steps.optimizer.init(trainable)
        paths, self.opt_treedef = jax.tree_util.tree_flatten_with_path(opt0)
        self.opt_names = [B.opt_name(leaf_path(p)) for p, _ in paths]
        if len(set(self.opt_names)) != len(self.opt_names):
            raise MobiletuneError("optimizer state has colliding leaf names")
        self._opt0 = [leaf for _, leaf in paths]
        self._trainable0 = trainable

    # --- the state layout ---------------------------------------------------------------
    def initial_state(self) -> dict[str, np.ndarray]:
        s = {B.trainable_name(k): np.asarray(self._trainable0[k]) for k in self.trainable_names}
        s.update({n: np.asarray(v) for n, v in zip(self.opt_names, self._opt0)})
        s.update({B.acc_name(k): np.zeros_like(np.asarray(self._trainable0[k]))
                  for k in self.trainable_names})
        s[B.ACC_NLL] = np.zeros((), np.float32)
        s[B.ACC_COUNT] = np.zeros((), np.float32)
        s[B.STEP] = np.zeros((), np.int32)
        return s

    def state_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(n, tuple(v.shape), str(v.dtype))
                     for n, v in sorted(self.initial_state().items()))

    def frozen_specs(self, frozen: dict) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(B.frozen_name(k), tuple(np.shape(frozen[k])),
                                str(np.asarray(frozen[k]).dtype)) for k in self.frozen_names)

    def _unpack(self, state) -> tuple[TrainState, Accum]:
        tr = {k: state[B.trainable_name(k)] for k in self.trainable_names}
        opt = jax.tree.unflatten(self.opt_treedef, [state[n] for n in self.opt_names])
        acc = Accum({k: state[B.acc_name(k)] for k in self.trainable_names}, state[B.ACC_NLL],
                    state[B.ACC_COUNT])
        return TrainState(tr, opt, state[B.STEP]), acc

    def _pack_train(self, ts: TrainState) -> dict:
        out = {B.trainable_name(k): ts.trainable[k] for k in self.trainable_names}
        out.update(dict(zip(self.opt_names, jax.tree.leaves(ts.opt_state))))
        out[B.STEP] = jnp.asarray(ts.step, jnp.int32)
        return out

    def _pack_acc(self, acc: Accum) -> dict:
        out = {B.acc_name(k): acc.grads[k] for k in self.trainable_names}
        out.update({B.ACC_NLL: acc.nll, B.ACC_COUNT: acc.count})
        return out

    @staticmethod
    def _frozen(frozen) -> dict:
        return B.frozen_part(frozen)

    # --- signatures -----------------------------------------------------------------------
    def accumulate(self, state, frozen, inputs, targets, loss_mask):
        ts, acc = self._unpack(state)
        batch = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
        before_nll, before_count = acc.nll, acc.count
        acc = self.steps.accumulate(acc, ts.trainable, self._frozen(frozen), batch, None)
        return self._pack_acc(acc), {"nll": acc.nll - before_nll, "count": acc.count - before_count}

    def apply(self, state, frozen):
        ts, acc = self._unpack(state)
        new, loss = self.steps.apply(ts, acc)
        upd = self._pack_train(new)
        upd.update(self._pack_acc(self.steps.zero_accum(ts.trainable)))
        return upd, {"loss": loss, "step": jnp.asarray(new.step, jnp.int32)}

    def train_step(self, state, frozen, inputs, targets, loss_mask):
        ts, _ = self._unpack(state)
        batch = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
        new, loss = self.steps.train_step(ts, self._frozen(frozen), batch, None)
        return self._pack_train(new), {"loss": loss}

    def eval(self, state, frozen, inputs, targets, loss_mask):
        ts, _ = self._unpack(state)
        batch = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
        nll, count = self.steps.eval_nll(ts.trainable, self._frozen(frozen), batch)
        return {}, {"nll": nll, "count": count}

    def infer(self, state, frozen, tokens, last):
        ts, _ = self._unpack(state)
        params = {**self._frozen(frozen), **ts.trainable}
        lora = None if self.steps.lcfg is None else self.steps.lcfg.ctx()
        h, _ = models.hidden_states(params, self.cfg, tokens, lora=lora)   # (1, T, D)
        h_last = jax.lax.dynamic_slice_in_dim(h, last, 1, axis=1)          # (1, 1, D)
        logits = models.unembed(params, self.cfg, h_last)[0, 0]            # (V,)
        return {}, {"logits": logits}

    # --- KV-cache decoding: the cache is (L, T, K, Dh) per keys / values, held by the host --
    def _params_lora(self, state, frozen):
        ts, _ = self._unpack(state)
        return ({**self._frozen(frozen), **ts.trainable},
                None if self.steps.lcfg is None else self.steps.lcfg.ctx())

    def prefill(self, state, frozen, tokens, last):
        """``infer`` plus every position's keys and values (L, T, K, Dh)."""
        params, lora = self._params_lora(state, frozen)
        cache = models.new_cache(self.cfg, batch=1, max_len=tokens.shape[1])
        h, cache = models.hidden_states(params, self.cfg, tokens, cache, lora=lora)  # (1, T, D)
        h_last = jax.lax.dynamic_slice_in_dim(h, last, 1, axis=1)                  # (1, 1, D)
        logits = models.unembed(params, self.cfg, h_last)[0, 0]                    # (V,)
        return {}, {"logits": logits, "k": jnp.stack(cache.k)[:, 0],
                    "v": jnp.stack(cache.v)[:, 0]}

    def decode(self, state, frozen, token, pos, k_cache, v_cache):
        """One token (1, 1) at position ``pos`` over the cache: its logits and its own keys
        and values (L, 1, K, Dh) for slot ``pos`` (the host writes them)."""
        from mobiletune.programs.sharded import decode_cfg
        params, lora = self._params_lora(state, frozen)
        n, cfg = self.cfg.num_layers, decode_cfg(self.cfg)
        cache = models.KVCache(tuple(k_cache[i][None] for i in range(n)),
                               tuple(v_cache[i][None] for i in range(n)), pos)
        h, cache = models.hidden_states(params, cfg, token, cache, lora=lora)       # (1, 1, D)
        logits = models.unembed(params, cfg, h)[0, 0]                               # (V,)

        def rows(bufs):                                                             # (L, 1, K, Dh)
            return jnp.stack([jax.lax.dynamic_slice_in_dim(b[0], pos, 1, axis=0) for b in bufs])
        return {}, {"logits": logits, "k": rows(cache.k), "v": rows(cache.v)}

    def cache_shape(self) -> tuple[int, ...]:
        c = self.cfg
        return (c.num_layers, self.seq_len, c.num_kv_heads, c.head_dim)

    def decode_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("token", (1, 1), "int32"), TensorSpec("pos", (), "int32"),
                TensorSpec(B.K_CACHE, self.cache_shape(), "float32"),
                TensorSpec(B.V_CACHE, self.cache_shape(), "float32"))

    def batch_specs(self, k: int) -> tuple[TensorSpec, ...]:
        t = self.seq_len
        return (TensorSpec("inputs", (k, t), "int32"), TensorSpec("targets", (k, t), "int32"),
                TensorSpec("loss_mask", (k, t), "float32"))

    def infer_specs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("tokens", (1, self.seq_len), "int32"), TensorSpec("last", (), "int32"))
