"""``mobiletune side serve``: the side-tuning server (``runtime.side.protocol`` is the
contract). Standard-library HTTP/1.1 (``ThreadingHTTPServer``, TLS through ``ssl``) in front
of a spool directory; one trainer thread consumes the spool in sequence order.

Reliability: a micro-batch is written to ``spool/`` (atomically, fsynced) before it is
acknowledged, so an acknowledged micro-batch survives any crash; a checkpoint moves the
``trained_through`` watermark and the spool below it is deleted; on restart the trainer
resumes from its checkpoint and replays the spool above it. Back-pressure: at most
``max_queue`` micro-batches wait untrained; beyond that the answer is 429 + Retry-After,
so the spool never grows without bound. One device (one token) per server.
"""

from __future__ import annotations

import json
import re
import threading
import traceback
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic
from mobiletune.io import http as H
from mobiletune.io import safetensors as st
from mobiletune.io.http import Refused
from mobiletune.runtime.side import protocol as P
from mobiletune.runtime.side.quantize import LEVELS
from mobiletune.side.trainer import SideTrainer, info

BATCH_RE = re.compile(rf"^{P.SESSIONS}/([\w.-]+)/batches/(\d+)$")
STATUS_RE = re.compile(rf"^{P.SESSIONS}/([\w.-]+)/status$")
SIDE_RE = re.compile(rf"^{P.SESSIONS}/([\w.-]+)/side$")


def read_tokens(path) -> tuple[str, str]:
    """(device, token) from a token file: one line ``<device> <token>``."""
    p = Path(path)
    try:
        lines = [x.split() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise MobiletuneError(f"--token-file {p}: cannot read ({e})") from None
    if len(lines) != 1 or len(lines[0]) != 2 or not re.fullmatch(r"[\w.-]+", lines[0][0]):
        raise MobiletuneError(f"--token-file {p}: expected one line '<device> <token>' (one "
                              f"device per server)")
    if len(lines[0][1]) < 16:
        raise MobiletuneError(f"--token-file {p}: the token is shorter than 16 characters")
    return lines[0][0], lines[0][1]


class SideService:
    """The server's state behind the HTTP handler: auth, the spool, the trainer thread."""

    def __init__(self, trainer: SideTrainer, device: str, token: str, max_queue: int = 8,
                 log=info):
        self.trainer, self.device, self.token, self.max_queue = trainer, device, token, max_queue
        self.log = log
        self.spool = trainer.out / "spool"
        self.spool.mkdir(exist_ok=True)
        self.cond = threading.Condition()
        self.error: str | None = None
        self.checkpointed = trainer.trained_through
        for p in self.spool.glob("*.safetensors"):  # below the watermark: already trained
            if int(p.stem) <= self.checkpointed:
                p.unlink()
        self.received = self.checkpointed
        while (self.spool / f"{self.received + 1:09d}.safetensors").exists():
            self.received += 1
        t = trainer
        self.expect = {"recipe": t.recipe.fingerprint(),
                       "side": P.side_config_hash(t.scfg.to_dict())}
        self._snapshot()
        self.thread = threading.Thread(target=self._train_loop, name="side-trainer", daemon=True)
        self.thread.start()

    # --- the spool ------------------------------------------------------------------------------
    def _path(self, seq: int) -> Path:
        return self.spool / f"{seq:09d}.safetensors"

    def _snapshot(self) -> None:
        """The side weights after the last completed step, as served (the trainer's own
        state moves on while requests read this)."""
        t = self.trainer
        data = st.dumps(t.side_tensors(), {"step": int(t.state.step),
                                           "recipe": t.recipe.fingerprint()})
        with self.cond:
            self.side_bytes, self.trained, self.side_step = data, t.trained_through, int(t.state.step)

    def _train_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.trainer.consumed >= self.received:
                        self.cond.wait()
                    seq = self.trainer.consumed + 1
                tensors, meta = st.loads(self._path(seq).read_bytes(), str(self._path(seq)))
                if self.trainer.train(seq, tensors, meta):
                    self._snapshot()
                    if self.trainer.trained_through > self.checkpointed and \
                            int(self.trainer.state.step) % self.trainer.checkpoint_every == 0:
                        self._drop_below(self.trainer.trained_through)
                with self.cond:
                    self.cond.notify_all()
        except Exception as e:  # a crash of the trainer thread is reported, not hidden
            self.error = f"{type(e).__name__}: {e}"
            self.log(f"side trainer stopped: {self.error}\n{traceback.format_exc()}")

    def _drop_below(self, seq: int) -> None:
        self.checkpointed = seq
        for p in self.spool.glob("*.safetensors"):
            if int(p.stem) <= seq:
                p.unlink()

    def finish(self, timeout: float | None = None) -> None:
        """Wait until everything received is trained, then checkpoint (what a clean stop
        does)."""
        with self.cond:
            self.cond.wait_for(lambda: self.trainer.consumed >= self.received or self.error,
                               timeout)
        if self.trainer.done == 0 and self.trainer.trained_through > self.checkpointed:
            self.trainer.checkpoint()
            self._drop_below(self.trainer.trained_through)

    # --- requests --------------------------------------------------------------------------------
    def auth(self, header: str | None, device: str | None) -> None:
        H.check_bearer(header, self.token)
        if device is not None and device != self.device:
            raise Refused(401, f"this token is not for device {device!r}")

    def status(self) -> dict:
        with self.cond:
            t = self.trainer
            cursor, step, done = t.cursor, int(t.state.step), 0
            if self.received > t.trained_through:
                _, meta = st.loads(self._path(self.received).read_bytes(), "spool")
                cursor, step, done = json.loads(meta["cursor"]), int(meta["step"]), int(meta["done"])
            return {"received_through": self.received, "trained_through": self.trained,
                    "side_step": self.side_step, "queue": self.received - t.consumed,
                    "cursor": cursor, "step": step, "done": done, "error": self.error,
                    "device": self.device}

    def open_session(self, body: bytes) -> dict:
        try:
            req = json.loads(body)
            assert isinstance(req, dict)
        except (ValueError, AssertionError):
            raise Refused(400, "the session request is not a JSON object") from None
        if req.get("device") != self.device:
            raise Refused(401, f"this token is not for device {req.get('device')!r}")
        for key, want in self.expect.items():
            if req.get(key) != want:
                raise Refused(409, f"the phone's bundle has {key} {req.get(key)!r}; this server "
                                   f"trains {key} {want!r} (export the bundle from the recipe "
                                   f"this server runs)", expected=self.expect)
        self.log(f"session: {self.device} (bundle {str(req.get('bundle'))[:12]})")
        return self.status()

    def put(self, seq: int, body: bytes, sha: str | None) -> dict:
        H.check_sha(body, sha, f"seq {seq}")
        with self.cond:
            if seq <= self.received:
                return self.status()  # a retry of what is stored already: idempotent
            if seq != self.received + 1:
                raise Refused(409, f"seq {seq}: out of order; the server has received through "
                                   f"{self.received}", **self.status())
            if self.received - self.trainer.consumed >= self.max_queue:
                raise Refused(429, f"the queue is full ({self.max_queue} micro-batches waiting)")
        self.check(seq, body)
        atomic.write_bytes(self._path(seq), body)  # durable before the answer
        with self.cond:
            self.received = seq
            self.cond.notify_all()
        return self.status()

    def check(self, seq: int, body: bytes) -> None:
        """400 naming what is wrong with a payload (keys, dtypes, shapes, values)."""
        try:
            tensors, meta = st.loads(body, f"seq {seq}")
        except st.SafetensorsError as e:
            raise Refused(400, str(e)) from None
        t = self.trainer
        try:
            k, mseq = int(meta["k"]), int(meta["seq"])
            json.loads(meta["cursor"]), int(meta["step"]), int(meta["done"])
        except (KeyError, ValueError):
            raise Refused(400, f"seq {seq}: metadata needs integer seq, k, step, done and a "
                               f"JSON cursor") from None
        if mseq != seq or k < 1 or t.recipe.batch_size % k:
            raise Refused(400, f"seq {seq}: metadata seq {mseq} / k {k} do not fit (k must "
                               f"divide the effective batch {t.recipe.batch_size})")
        n = t.recipe.seq_len
        want = {"inputs": (np.int32, (k, n)), "targets": (np.int32, (k, n)),
                "loss_mask": (np.float32, (k, n))}
        for name, width, p in [*((P.tap_name(j, ""), t.tap_width, t.scfg.precision)
                                 for j in range(len(t.tapped))),
                               (P.last_name(""), t.cfg.hidden_size, t.scfg.last_precision)]:
            if p in LEVELS:
                qw = width if p == "int8" else (width + 1) // 2
                want[name + "q"] = (np.int8 if p == "int8" else np.uint8, (k, n, qw))
                want[name + "scale"] = (np.float32, (k, n))
            else:
                want[name + "x"] = (np.float32 if p == "fp32" else np.float16, (k, n, width))
        try:
            H.check_payload(tensors, want, f"seq {seq}")
        except H.PayloadError as e:
            raise Refused(400, str(e)) from None
        for name in ("inputs", "targets"):
            a = tensors[name]
            if a.min() < 0 or a.max() >= t.cfg.vocab_size:
                raise Refused(400, f"seq {seq}: tensor {name!r} has token ids outside "
                                   f"[0, {t.cfg.vocab_size})")

    def side(self, etag: str | None) -> tuple[int, bytes, str]:
        with self.cond:
            data = self.side_bytes
        sha = P.sha256(data)
        return (304, b"", sha) if etag == f'"{sha}"' else (200, data, sha)


class Handler(H.JsonHandler):
    service: SideService

    def route(self, method: str, path: str):
        s = self.service
        m = BATCH_RE.match(path) or STATUS_RE.match(path) or SIDE_RE.match(path)
        s.auth(self.headers.get("Authorization"), m.group(1) if m else None)
        if method == "POST" and path == P.SESSIONS:
            return 200, s.open_session(self.body())
        if method == "PUT" and BATCH_RE.match(path):
            return 202, s.put(int(m.group(2)), self.body(), self.headers.get(P.SHA_HEADER))
        if method == "GET" and STATUS_RE.match(path):
            return 200, s.status()
        if method == "GET" and SIDE_RE.match(path):
            code, data, sha = s.side(self.headers.get("If-None-Match"))
            return code, data, "application/octet-stream", {"ETag": f'"{sha}"'}
        raise Refused(404, f"no such endpoint: {method} {path}")


def make_server(service: SideService, host: str, port: int, tls_cert=None, tls_key=None):
    return H.make_server(Handler, service, host, port, tls_cert, tls_key)


def serve(recipe, out, host: str, port: int, token_file, tls_cert=None, tls_key=None,
          max_queue: int = 8, checkpoint_every: int = 10) -> int:
    """Run until SIGTERM/SIGINT; writes ``<out>/server.json`` (url, pid) once listening."""
    import os
    import signal
    device, token = read_tokens(token_file)
    if bool(tls_cert) != bool(tls_key):
        raise MobiletuneError("--tls-cert and --tls-key go together")
    trainer = SideTrainer(recipe, out, checkpoint_every=checkpoint_every)
    service = SideService(trainer, device, token, max_queue)
    httpd = make_server(service, host, port, tls_cert, tls_key)
    url = H.url_of(httpd, host, bool(tls_cert))
    atomic.write_text(Path(out) / "server.json",
                      json.dumps({"url": url, "pid": os.getpid(), "device": device}) + "\n")
    info(f"side server: {url} (device {device}; recipe {recipe.name})")

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        service.finish(timeout=600)
        info(f"side server: stopped at step {int(trainer.state.step)} (trained through seq "
             f"{trainer.trained_through})")
    return 1 if service.error else 0

