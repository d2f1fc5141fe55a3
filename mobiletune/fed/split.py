"""SplitLoRA's server half (JAX): layers k … L-1, the final norm, the head and the loss of a
sharded bundle, with its own LoRA factors for those layers, behind the split wire contract
(``mobiletune.runtime.split.protocol``) on the side-tuning transport (``mobiletune.io.http``).

Per micro-batch a phone sends h_k (and the targets); the server runs its layers with the
bundle's own block function (``programs.sharded.ShardedModel.block_fwd``, the function the
phone's ``block_fwd`` signature was traced from), the final norm and the project's chunked
cross-entropy, and takes the summed NLL's gradient with respect to h_k and to its LoRA
factors with one ``jax.vjp``; dL/dh_k goes back down. At the phone's ``apply`` the server
divides its accumulated gradient by the token count and steps the recipe's optax optimizer
(clipping included: each side clips its own gradient's global norm).

Variant (SplitFed-v2 style, as in SplitLoRA): one server-side adapter, shared by every
client and trained on each client's activations in turn; one device's optimizer step is
open at a time (another device's micro-batch meanwhile is a 409), and the federated
strategy sends the clients their rounds one after another in partition order, so the run
is deterministic. The client-side factors (layers < k) are FedAvg'd between rounds.

The frozen weights come from the bundle's own weight store (the float32, float16 or int8
widened values the phones compute with), the initial LoRA factors from its state file.
"""

from __future__ import annotations

import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mobiletune.errors import MobiletuneError
from mobiletune.io import http as H
from mobiletune.io import safetensors as st
from mobiletune.io.http import Refused
from mobiletune.models.config import ModelConfig
from mobiletune.models.lora import LoraConfig
from mobiletune.programs.monolithic import leaf_path
from mobiletune.programs.sharded import ShardedModel
from mobiletune.runtime import bundle as B
from mobiletune.runtime.bundle import read_manifest
from mobiletune.runtime.sharded.weights import WeightStore
from mobiletune.runtime.split import protocol as P
from mobiletune.runtime.split.runner import client_names
from mobiletune.train.loss import nll_sum
from mobiletune.train.optim import OptimConfig, make_optimizer

OPTIM = "optim/"   # checkpoint names of the server optimizer's leaves (optax tree paths)


def default_cut(num_layers: int) -> int:
    """Half the layers on the phone (at least one on each side)."""
    return max(1, num_layers // 2)


class SplitServer:
    """The server's layers of one sharded LoRA bundle, cut at ``cut``."""

    def __init__(self, bundle, cut: int | None = None):
        from pathlib import Path
        self.dir = Path(bundle)
        m = self.manifest = read_manifest(self.dir)
        if m.lora is None:
            raise MobiletuneError(f"{bundle}: SplitLoRA exchanges LoRA adapters; this bundle "
                                  f"fine-tunes every weight")
        lay = m.sharded
        n = len(lay.layers) if lay is not None else 0
        self.cut = default_cut(n) if cut is None else cut
        self.client = set(client_names(m, self.cut))      # checks sharded and the cut's range
        self.cfg = ModelConfig.from_dict(m.model)
        self.lcfg = LoraConfig.from_dict(m.lora)
        self.optim = OptimConfig(**m.optim)
        self.seq_len, self.variants = m.seq_len, tuple(m.variants)
        init = st.load(self.dir / B.STATE, mmap=False)
        trainable = {s.name[len(B.TRAINABLE):]: tuple(s.shape) for s in m.state
                     if s.name.startswith(B.TRAINABLE)}
        self.layers = lay.layers[self.cut:]
        mine = tuple(ly.prefix for ly in self.layers)
        self.names = sorted(t for t in trainable if t not in self.client)
        stray = [t for t in self.names if not t.startswith(mine)]
        if stray:
            raise MobiletuneError(f"{bundle}: trainable tensor {stray[0]!r} is outside the "
                                  f"blocks; SplitLoRA trains LoRA factors of the blocks only")
        store = WeightStore(self.dir / B.WEIGHTS)
        frozen_shapes = {k: e[1] for k, e in store.entries.items() if k not in trainable}
        self.sm = ShardedModel(self.cfg, self.lcfg, self.optim, trainable, frozen_shapes,
                               self.seq_len, vocab_chunk=lay.vocab_chunk)
        self.kinds = lay.kinds
        self.frozen = {ly.prefix + r: jnp.asarray(store.get(ly.prefix + r))
                       for ly in self.layers for r in lay.kinds[ly.kind].frozen}
        self.frozen.update({k: jnp.asarray(store.get(k)) for k in (*lay.norm, lay.head)})
        self.head, self.norm_names = lay.head, lay.norm
        # the state file leaves out all-zero tensors (LoRA's B): zeros where it has none
        self.lora = {t: jnp.asarray(init[B.TRAINABLE + t]) if B.TRAINABLE + t in init
                     else jnp.zeros(trainable[t], jnp.float32) for t in self.names}
        self.tx = make_optimizer(self.optim, self.cfg.family)
        self.opt_state = self.tx.init(self.lora)
        self.step = 0
        self.zero()
        self._fb = jax.jit(self._forward_backward)
        self._apply = jax.jit(self._update)

    # --- the math ---------------------------------------------------------------------------
    def loss(self, h, lora: dict, frozen: dict, targets, mask):
        """Summed NLL of layers cut … L-1 + final norm + head from h_cut (k, T, D)."""
        for ly in self.layers:
            kind = self.kinds[ly.kind]
            w = {r: frozen[ly.prefix + r] for r in kind.frozen}
            w.update({r: lora[ly.prefix + r] for r in kind.trainable})
            attn = None if ly.attn is None else (jnp.float32(ly.attn[0]), jnp.float32(ly.attn[1]),
                                                 jnp.int32(ly.attn[2]))
            h = self.sm.block_fwd(h, attn, w)
        hn = self.sm.norm_fwd(h, {n: frozen[n] for n in self.norm_names})
        return nll_sum(hn, frozen[self.head], targets, mask, self.cfg.final_logit_softcapping,
                       64, False, self.cfg.matmul)

    def _forward_backward(self, h, lora, frozen, targets, mask):
        nll, vjp = jax.vjp(lambda x, lo: self.loss(x, lo, frozen, targets, mask), h, lora)
        dh, dlora = vjp(jnp.ones((), jnp.float32))
        return nll, dh, dlora

    def _update(self, lora, opt_state, acc, count):
        g = jax.tree.map(lambda a: a / jnp.maximum(count, 1.0), acc)
        upd, opt_state = self.tx.update(g, opt_state, lora)
        return optax.apply_updates(lora, upd), opt_state

    # --- one micro-batch, one step ------------------------------------------------------------
    def zero(self) -> None:
        self.acc = {t: np.zeros(self.lora[t].shape, np.float32) for t in self.names}
        self.acc_count = np.zeros((), np.float32)

    def forward_backward(self, h, targets, mask) -> tuple[float, float, np.ndarray]:
        """(summed NLL, tokens, dL/dh_cut) of one micro-batch; the LoRA gradients are added
        to the accumulators."""
        nll, dh, dlora = self._fb(jnp.asarray(h), self.lora, self.frozen, jnp.asarray(targets),
                                  jnp.asarray(mask))
        for t in self.names:
            self.acc[t] += np.asarray(dlora[t])
        count = np.float32(np.asarray(mask, np.float32).sum(dtype=np.float32))
        self.acc_count += count
        return float(nll), float(count), np.asarray(dh, np.float32)

    def apply(self) -> int:
        self.lora, self.opt_state = self._apply(self.lora, self.opt_state,
                                                {t: jnp.asarray(a) for t, a in self.acc.items()},
                                                jnp.asarray(self.acc_count))
        self.step += 1
        self.zero()
        return self.step

    # --- what the strategy reads and checkpoints ----------------------------------------------
    def wire(self) -> dict:
        """The server's LoRA factors under PEFT's wire names."""
        from mobiletune.fed.adapter import PREFIX
        return {PREFIX + t: np.asarray(v, np.float32) for t, v in self.lora.items()}

    def state(self) -> dict:
        out = {f"lora/{t}": np.asarray(v) for t, v in self.lora.items()}
        paths, _ = jax.tree_util.tree_flatten_with_path(self.opt_state)
        out.update({OPTIM + leaf_path(p): np.asarray(v) for p, v in paths})
        out["step"] = np.asarray(self.step, np.int64)
        return out

    def load_state(self, d: dict) -> None:
        missing = [f"lora/{t}" for t in self.names if f"lora/{t}" not in d]
        if missing:
            raise MobiletuneError(f"split server checkpoint: key {missing[0]!r} is missing")
        self.lora = {t: jnp.asarray(d[f"lora/{t}"]) for t in self.names}
        paths, treedef = jax.tree_util.tree_flatten_with_path(self.tx.init(self.lora))
        leaves = []
        for p, v in paths:
            k = OPTIM + leaf_path(p)
            if k not in d or np.shape(d[k]) != np.shape(v):
                raise MobiletuneError(f"split server checkpoint: key {k!r} is missing or has "
                                      f"another shape")
            leaves.append(jnp.asarray(d[k], v.dtype))
        self.opt_state = jax.tree.unflatten(treedef, leaves)
        self.step = int(d["step"])
        self.zero()


class SplitService:
    """The server's state behind the HTTP handler: auth, one open step at a time, retries
    answered from the last answer, and the bytes each way per device."""

    def __init__(self, server: SplitServer, secret: str, log=None):
        if len(secret) < 16:
            raise MobiletuneError("split server: the secret is shorter than 16 characters")
        self.server, self.secret, self.log = server, secret, log or (lambda m: None)
        self.lock = threading.Lock()
        self.open_device: str | None = None
        self.last: tuple | None = None           # ((device, step, micro), answer)
        self.last_apply: tuple | None = None     # ((device, step), answer)
        self.bytes_up: dict[str, int] = {}
        self.bytes_down: dict[str, int] = {}

    def token_for(self, device: str) -> str:
        """The bearer token ``device`` must present (``protocol.device_token``)."""
        return P.device_token(self.secret, device)

    def exchange(self, device: str, step: int, micro: int, body: bytes, sha: str | None) -> bytes:
        where = f"split {device} step {step} micro-batch {micro}"
        H.check_sha(body, sha, where)
        with self.lock:
            key = (device, step, micro)
            if self.last is not None and self.last[0] == key:
                return self.last[1]                # a retry: same answer, nothing added
            if self.open_device not in (None, device):
                raise Refused(409, f"{where}: device {self.open_device!r} has an optimizer "
                                   f"step open; one device at a time")
            t = self._check(body, where)
            nll, count, dh = self.server.forward_backward(t["h"], t["targets"], t["loss_mask"])
            out = P.encode({"dh": dh, "nll": np.float32(nll), "count": np.float32(count)})
            self.open_device, self.last = device, (key, out)
            self.bytes_up[device] = self.bytes_up.get(device, 0) + len(body)
            self.bytes_down[device] = self.bytes_down.get(device, 0) + len(out)
            return out

    def _check(self, body: bytes, where: str) -> dict:
        s = self.server
        try:
            tensors, _ = st.loads(body, where)
            k = int(np.shape(tensors["targets"])[0]) if "targets" in tensors else 0
            if k not in s.variants:
                raise H.PayloadError(f"{where}: a micro-batch of {k} rows; the bundle's "
                                     f"variants are {list(s.variants)}")
            H.check_payload(tensors, P.up_spec(k, s.seq_len, s.cfg.hidden_size), where)
        except (st.SafetensorsError, H.PayloadError, IndexError) as e:
            raise Refused(400, str(e)) from None
        tg = tensors["targets"]
        if tg.min() < 0 or tg.max() >= s.cfg.vocab_size:
            raise Refused(400, f"{where}: tensor 'targets' has token ids outside "
                               f"[0, {s.cfg.vocab_size})")
        return tensors

    def apply(self, device: str, step: int) -> dict:
        with self.lock:
            key = (device, step)
            if self.last_apply is not None and self.last_apply[0] == key:
                return self.last_apply[1]
            if self.open_device != device:
                raise Refused(409, f"split {device} step {step}: no micro-batch of this "
                                   f"device is waiting for an optimizer step")
            out = {"server_step": self.server.apply()}
            self.open_device, self.last_apply = None, (key, out)
            return out

    def discard_open(self) -> None:
        """Drop a step a device left open (it failed or vanished mid-step)."""
        with self.lock:
            if self.open_device is not None:
                self.log(f"split: dropping the open step of {self.open_device}")
                self.server.zero()
            self.open_device = None

    def take_bytes(self) -> tuple[dict, dict]:
        """(bytes up, bytes down) per device since the last call."""
        with self.lock:
            up, down = self.bytes_up, self.bytes_down
            self.bytes_up, self.bytes_down = {}, {}
            return up, down


EXCHANGE_RE = re.compile(rf"^{P.SPLIT}/([\w.-]+)/steps/(\d+)/micro/(\d+)$")
APPLY_RE = re.compile(rf"^{P.SPLIT}/([\w.-]+)/steps/(\d+)/apply$")


class SplitHandler(H.JsonHandler):
    service: SplitService

    def route(self, method: str, path: str):
        s = self.service
        ex, ap = EXCHANGE_RE.match(path), APPLY_RE.match(path)
        m = ex or ap   # each device authenticates as itself; a path naming no device matches no token
        H.check_bearer(self.headers.get("Authorization"), s.token_for(m.group(1) if m else ""))
        if method == "PUT" and ex:
            return 200, s.exchange(ex.group(1), int(ex.group(2)), int(ex.group(3)), self.body(),
                                   self.headers.get(H.SHA_HEADER)), "application/octet-stream"
        if method == "POST" and ap:
            self.body()
            return 200, s.apply(ap.group(1), int(ap.group(2)))
        raise Refused(404, f"no such endpoint: {method} {path}")


def start(service: SplitService, host: str = "127.0.0.1", port: int = 0, tls_cert=None,
          tls_key=None):
    """Serve ``service`` on a daemon thread: (httpd, url); ``httpd.shutdown()`` stops it."""
    httpd = H.make_server(SplitHandler, service, host, port, tls_cert, tls_key)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                     name="split-server", daemon=True).start()
    return httpd, H.url_of(httpd, host, bool(tls_cert))


class DirectLink:
    """The phone's link as an in-process call into the service, through the same bytes
    (what a test or a one-process simulation uses in place of ``SplitClient``)."""

    def __init__(self, service: SplitService, device: str):
        self.service, self.device = service, device

    def exchange(self, step: int, micro: int, body: bytes) -> bytes:
        try:
            return self.service.exchange(self.device, step, micro, body, H.sha256(body))
        except Refused as e:
            raise MobiletuneError(f"split step {step} micro-batch {micro} refused ({e.code}): "
                                  f"{e}") from None

    def apply(self, step: int) -> dict:
        try:
            return self.service.apply(self.device, step)
        except Refused as e:
            raise MobiletuneError(f"split apply {step} refused ({e.code}): {e}") from None
