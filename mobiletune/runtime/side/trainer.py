"""``mobiletune device side-train``: the phone's side-tuning loop. The device trainer's
scheduling (battery readings, variants, throttle, pauses, checkpoints) with a different
step: each micro-batch runs the frozen backbone forward (``block_fwd`` per layer; with
``side.cut`` = c only layers 0 … c-1, whose output h_c is all it sends), its
tapped hidden states are quantized and handed to a sender thread that uploads them while
the next forward runs (a bounded window of micro-batches in flight: back-pressure);
nothing is trained on the phone.

The server is the source of truth for progress: it acknowledges a micro-batch only once
it is stored durably, and a (re)connecting phone resumes from the server's status — the
sequence number and the data cursor after the last micro-batch it holds — so a kill of
either side, or a cut connection, loses nothing and repeats nothing. At the end the phone
waits until the server has trained everything and fetches the side weights
(``side.safetensors``, checked against the bundle) for ``device generate``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.io import safetensors as st
from mobiletune.runtime import bundle as B
from mobiletune.runtime import data as D
from mobiletune.runtime.device_trainer import DeviceRun, DeviceTrainer, info, prepare_data
from mobiletune.runtime.metrics import peak_rss_mb
from mobiletune.runtime.runner import open_bundle
from mobiletune.runtime.side import protocol as P
from mobiletune.runtime.side.client import OutOfOrder, ServerUnavailable, SideClient
from mobiletune.runtime.side.config import SideConfig
from mobiletune.runtime.side.quantize import pool, quantize
from mobiletune.runtime.tokenizer import Tokenizer

SIDE_WEIGHTS = "side.safetensors"
SIDE_CONFIG = "side_config.json"   # beside the weights: what `generate --side DIR` reads


def recipe_fingerprint(m: B.Manifest) -> str:
    """The fingerprint of the recipe the bundle was exported from (as ``Recipe``'s)."""
    return P.sha256(json.dumps(m.recipe, sort_keys=True).encode())[:16]


def read_token(path) -> tuple[str, str]:
    """(device, token) from a token file ``<device> <token>`` (keep it mode 0600)."""
    p = Path(path)
    try:
        parts = p.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as e:
        raise MobiletuneError(f"--token-file {p}: cannot read ({e})") from None
    if len(parts) != 2:
        raise MobiletuneError(f"--token-file {p}: expected one line '<device> <token>'")
    if p.stat().st_mode & 0o077:
        info(f"side: {p} is readable by others; chmod 600 it")
    return parts[0], parts[1]


class Sender:
    """Uploads payloads in order on its own thread and connection; ``put`` blocks while
    ``window`` payloads are in flight."""

    def __init__(self, client: SideClient, window: int):
        self.client, self.error = client, None
        self.q: queue.Queue = queue.Queue(maxsize=window)
        self.thread = threading.Thread(target=self._run, name="side-sender", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    self.client.put_batch(*item)
            except Exception as e:  # handed to the producer at its next put / flush
                self.error = e
            finally:
                self.q.task_done()

    def _raise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def put(self, seq: int, payload: bytes) -> float:
        """Seconds spent waiting for room in the window."""
        self._raise()
        t0 = time.perf_counter()
        self.q.put((seq, payload))
        return time.perf_counter() - t0

    def flush(self) -> None:
        self.q.join()
        self._raise()

    def close(self) -> None:
        self.q.put(None)
        self.thread.join(timeout=30)
        self.client.close()


class SideDeviceTrainer(DeviceTrainer):
    def __init__(self, runner, bundle, train: D.Dataset, out, client: SideClient,
                 sender_client: SideClient, **kw):
        super().__init__(runner, bundle, train, out, **kw)
        if self.m.side is None:
            raise MobiletuneError(f"{bundle}: not a side-tuning bundle (export it with --side)")
        self.side = self.m.side
        self.scfg = SideConfig.from_dict(self.side.config)
        self.client = client
        self.sender = Sender(sender_client, self.scfg.window)
        self.seq = self.done = 0

    # --- the server is the source of truth ---------------------------------------------------
    def connect(self) -> dict:
        status = self.client.open_session(recipe_fingerprint(self.m),
                                          P.side_config_hash(self.side.config), self.bundle_hash)
        self.sync(status)
        return status

    def sync(self, status: dict) -> None:
        self.seq = int(status["received_through"])
        if status["cursor"] is not None:
            self.data = D.BatchIterator.from_state(self.train, min(self.m.variants),
                                                   self.m.data["seed"], status["cursor"],
                                                   batch_size=self.m.effective_batch)
        elif self.seq:
            raise MobiletuneError(f"{self.client.url}: the server holds {self.seq} micro-batches "
                                  f"but no data cursor")
        self.step, self.done = int(status["step"]), int(status["done"])
        if self.done >= self.m.effective_batch:
            self.step, self.done = self.step + 1, 0

    def resume(self) -> int:
        self.connect()
        self.log(f"resumed from step {self.step} (the server holds {self.seq} micro-batches)")
        return self.step

    def checkpoint(self) -> None:
        """The phone keeps only its cursor (the server has the data): what it has produced."""
        self.ckpts.save(self.step, {}, {"data": self.data.state(), "bundle": self.bundle_hash,
                                         "seq": self.seq, "done": self.done})

    # --- one optimizer step's worth of micro-batches ----------------------------------------
    def encode(self, b: dict, hs: list, k: int) -> bytes:
        t = {"inputs": np.asarray(b["inputs"], np.int32),
             "targets": np.asarray(b["targets"], np.int32),
             "loss_mask": np.asarray(b["loss_mask"], np.float32)}
        p = self.scfg.precision
        for j, i in enumerate(self.side.tapped):
            h = hs[i + 1] if self.scfg.width == "full" else pool(hs[i + 1], self.scfg.reduction)
            t.update({P.tap_name(j, part): a for part, a in quantize(h, p).items()})
        t.update({P.last_name(part): a for part, a in
                  quantize(hs[-1], self.scfg.last_precision).items()})
        return st.dumps(t, {"seq": self.seq, "k": k, "step": self.step, "done": self.done,
                            "cursor": json.dumps(self.data.state())})

    def optimizer_step(self, reading) -> dict:
        decision, eff = self.decision, self.m.effective_batch
        t0 = time.perf_counter()
        tokens = slept = fwd = enc = blocked = 0.0
        sent0 = self.sender.client.bytes_sent
        while self.done < eff:
            k = decision.variant if (eff - self.done) % decision.variant == 0 else min(self.m.variants)
            t_micro = time.perf_counter()
            b = self.data.next(k)
            hs = self.runner.hidden_states(b["inputs"], upto=self.scfg.cut)   # cut: h_0 … h_cut
            t1 = time.perf_counter()
            self.seq, self.done = self.seq + 1, self.done + k
            payload = self.encode(b, hs, k)
            t2 = time.perf_counter()
            try:
                blocked += self.sender.put(self.seq, payload)
            except OutOfOrder as e:  # the server has another view: take it and go on
                self.log(f"side: {e}; resynchronising")
                self.sync(e.status)
                continue
            fwd, enc = fwd + t1 - t_micro, enc + t2 - t1
            tokens += float(b["loss_mask"].sum())
            pause = decision.sleep_after(time.perf_counter() - t_micro)
            if pause:
                self.clock.sleep(pause)
                slept += pause
        self.step, self.done = self.step + 1, 0
        compute = time.perf_counter() - t0 - slept
        self.clock.advance(compute)
        after = self.read()
        return {"step": self.step, "loss": None, "tokens": tokens, "seconds": compute,
                "forward_s": fwd, "encode_s": enc, "blocked_s": blocked, "seq": self.seq,
                "bytes": self.sender.client.bytes_sent - sent0,
                "peak_rss_mb": round(peak_rss_mb(), 1), "variant": decision.variant,
                "sleep": slept, "reason": decision.reason,
                "energy_j": self.meter.step(reading, after), "time": self.clock.now()}

    def progress(self, row: dict) -> dict:
        return {"k": row["variant"], "tok_s": f"{row['tokens'] / max(row['seconds'], 1e-9):.3g}",
                "MB": f"{row['bytes'] / 2**20:.1f}"}

    def run(self, steps: int, stop_after: int | None = None) -> DeviceRun:
        try:
            return super().run(steps, stop_after)
        except ServerUnavailable as e:
            self.log(f"side: {e}; stopping with the cursor saved (rerun with --resume)")
            self.checkpoint()
            return DeviceRun(self.step, False, "server unavailable", self.out)
        finally:
            self.sender.close()

    def write_outputs(self) -> None:
        """Wait until the server has trained every micro-batch sent, then fetch the side
        weights into ``side.safetensors``."""
        self.sender.flush()
        status, wait = self.client.status(), 0.2
        while status["trained_through"] < self.seq:
            if status.get("error"):
                raise MobiletuneError(f"{self.client.url}: the server's trainer failed: "
                                      f"{status['error']}")
            time.sleep(wait)
            wait = min(wait * 1.5, 5.0)
            status = self.client.status()
        data = self.client.side_weights()
        check_side_weights(st.loads(data, f"{self.client.url} side weights")[0], self.m,
                           "the server's side weights")
        from mobiletune.io import atomic
        atomic.write_bytes(self.out / SIDE_WEIGHTS, data)
        atomic.write_text(self.out / SIDE_CONFIG, json.dumps(self.side.config, indent=1) + "\n")
        self.log(f"side weights: {self.out / SIDE_WEIGHTS} (server step {status['side_step']})")


def check_side_weights(w: dict, m: B.Manifest, source: str) -> dict:
    """The side weights ``m``'s side program takes, each with its shape; else one error."""
    want = m.side.shapes
    for name in sorted(set(want) | set(w)):
        if name not in w or name not in want:
            raise MobiletuneError(f"{source}: tensor {name!r} is "
                                  f"{'missing' if name not in w else 'not part of this bundle'}")
        if tuple(w[name].shape) != tuple(want[name]) or w[name].dtype != np.float32:
            raise MobiletuneError(f"{source}: tensor {name!r} is {w[name].dtype}"
                                  f"{list(w[name].shape)}, the bundle needs float32"
                                  f"{list(want[name])}")
    return w


def device_side_train(bundle, data_paths, out, server: str, token_file, cafile=None,
                      steps: int | None = None, battery: str = "auto", threads=None,
                      resume: bool = False, thresholds=None, checkpoint_every: int = 10,
                      max_offline_s: float = 600, clock=None) -> DeviceRun:
    device, token = read_token(token_file)
    runner = open_bundle(bundle, threads=threads)
    train = prepare_data(runner, Tokenizer.from_dir(bundle), data_paths)
    mk = lambda: SideClient(server, token, device, cafile, max_offline_s=max_offline_s,  # noqa: E731
                            log=info)
    t = SideDeviceTrainer(runner, bundle, train, out, mk(), mk(), battery=battery,
                          thresholds=thresholds, checkpoint_every=checkpoint_every, clock=clock)
    if not resume and t.ckpts.latest() is not None:
        raise MobiletuneError(f"{out}: has checkpoints from an earlier run; pass --resume")
    try:
        status = t.connect()
    except ServerUnavailable as e:
        t.sender.close()
        raise MobiletuneError(f"{e}; nothing was sent (start the server, then rerun)") from None
    if status["received_through"] and not resume:
        t.sender.close()
        raise MobiletuneError(f"{server}: already holds {status['received_through']} micro-batches "
                              f"from {device}; pass --resume to continue that run")
    if resume:
        t.log(f"resumed from step {t.step} (the server holds {t.seq} micro-batches)")
    return t.run(steps or t.m.steps)
