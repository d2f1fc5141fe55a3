"""``SplitRunner``: a sharded bundle's runner whose training step is cut at layer k. Per
micro-batch the phone embeds the tokens and runs ``block_fwd`` for layers 0 … k-1 (the
chain's own ``hidden_states``), sends h_k up, gets dL/dh_k back and runs ``block_bwd`` for
layers k-1 … 0 (the chain's ``backward_blocks``) into the host accumulators; ``apply`` is
the bundle's optimizer step (``runtime.sharded.optimizer``) followed by the server's. Layers
k … L-1, the final norm, the head and the loss are the server's; so are their LoRA factors
(the phone's copies of them are never read in training).

The link is ``SplitClient`` (HTTP, ``mobiletune.io.http``) or anything with the same two
methods taking and giving the same bytes (``exchange(step, micro, body) -> bytes``,
``apply(step) -> dict``), e.g. an in-process call into the server in a simulation.
Everything else (state, evaluation, inference) is the wrapped ``ShardedRunner``'s, so the
device trainer, its scheduler and checkpoints run unchanged.
"""

from __future__ import annotations

import json
import time

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.io import http as H
from mobiletune.runtime import bundle as B
from mobiletune.runtime.runner import check_variant
from mobiletune.runtime.split import protocol as P


def client_names(manifest: B.Manifest, cut: int) -> list[str]:
    """The trainable tensors the phone trains at cut ``cut``: those of layers 0 … cut-1."""
    lay = manifest.sharded
    if lay is None:
        raise MobiletuneError("SplitLoRA runs the first k blocks of a sharded bundle; this "
                              "bundle is monolithic (export with --sharded)")
    n = len(lay.layers)
    if type(cut) is not int or not 1 <= cut <= n - 1:
        raise MobiletuneError(f"split cut={cut!r}: must be an integer in [1, {n - 1}] for a "
                              f"{n}-layer model (the phone runs layers 0 … cut-1)")
    prefixes = tuple(ly.prefix for ly in lay.layers[:cut])
    return sorted(s.name[len(B.TRAINABLE):] for s in manifest.state
                  if s.name.startswith(B.TRAINABLE) and s.name[len(B.TRAINABLE):].startswith(prefixes))


class SplitClient(H.HttpClient):
    """The phone's HTTP link to the split server (one device name per phone)."""

    def __init__(self, url: str, token: str, device: str, cafile=None, timeout_s: float = 120,
                 max_offline_s: float = 120, log=print, sleep=time.sleep):
        super().__init__(url, token, cafile, timeout_s, max_offline_s, log, sleep, what="split")
        self.device = device

    def exchange(self, step: int, micro: int, body: bytes) -> bytes:
        status, data = self.put_bytes(P.exchange_path(self.device, step, micro), body)
        if status != 200:
            raise MobiletuneError(f"{self.url}: split step {step} micro-batch {micro} refused "
                                  f"({status}): {H.error_text(data)}")
        return data

    def apply(self, step: int) -> dict:
        return self.json("POST", P.apply_path(self.device, step), {})


class SplitRunner:
    def __init__(self, inner, cut: int, link, on_exchange=None):
        """``inner``: a ``ShardedRunner``; ``on_exchange(bytes_up, bytes_down)`` is called
        after each micro-batch's exchange (the federated client charges the link's time)."""
        self.names = client_names(inner.manifest, cut)
        self.inner, self.cut, self.link, self.on_exchange = inner, cut, link, on_exchange
        self.manifest = inner.manifest
        self.bytes_up = self.bytes_down = self.exchanges = 0
        self._micro = 0

    def __getattr__(self, name):  # state, eval, inference: the wrapped runner's
        return getattr(self.inner, name)

    def accumulate(self, batch: dict) -> tuple[float, float]:
        k = check_variant(self.manifest, batch)
        ids = np.asarray(batch["inputs"], np.int32)
        hs = self.inner.hidden_states(ids, self.cut)
        up = {"h": hs[-1], "targets": np.asarray(batch["targets"], np.int32),
              "loss_mask": np.asarray(batch["loss_mask"], np.float32)}
        body = P.encode(up)
        step = int(self.inner.state.step) + 1
        down = self.link.exchange(step, self._micro, body)
        d = P.decode(down, P.down_spec(k, *hs[-1].shape[1:]),
                     f"split server's answer to step {step} micro-batch {self._micro}")
        self._micro += 1
        self.bytes_up += len(body)
        self.bytes_down += len(down)
        self.exchanges += 1
        if self.on_exchange:
            self.on_exchange(len(body), len(down))
        self.inner.backward_blocks(ids, hs, d["dh"])
        nll, count = float(d["nll"]), float(d["count"])
        self.inner.state.acc_nll[...] += np.float32(nll)
        self.inner.state.acc_count[...] += np.float32(count)
        return nll, count

    def apply(self) -> tuple[float, int]:
        step = int(self.inner.state.step) + 1
        loss, done = self.inner.apply()
        got = self.link.apply(step)
        self._micro = 0
        if not isinstance(got, dict) or "server_step" not in got:
            raise MobiletuneError(f"split server's answer to apply {step}: {json.dumps(got)[:200]}")
        return loss, done
