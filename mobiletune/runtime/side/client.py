"""The phone's side-tuning client (standard library only): HTTP/1.1 over one keep-alive
connection (``http.client``; TLS with the server's certificate from ``cafile``), a bearer
token on every request, and the retry policy — a refused or dropped connection and a 429
are retried with exponential backoff and jitter, with one line saying why; after
``max_offline_s`` without an answer it gives up with ``ServerUnavailable``, which the
trainer turns into a checkpoint and a stop. 401 and 409 are final (``MobiletuneError``)."""

from __future__ import annotations

import http.client
import json
import random
import ssl
import time
from urllib.parse import urlparse

from mobiletune.errors import MobiletuneError
from mobiletune.runtime.side import protocol as P


class ServerUnavailable(MobiletuneError):
    """The server did not answer for longer than the client waits."""


class OutOfOrder(MobiletuneError):
    """The server has another sequence than the phone (409 on a batch): resynchronise."""

    def __init__(self, msg: str, status: dict):
        super().__init__(msg)
        self.status = status


class SideClient:
    def __init__(self, url: str, token: str, device: str, cafile=None, timeout_s: float = 60,
                 max_offline_s: float = 600, log=print, sleep=time.sleep, seed: int = 0):
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise MobiletuneError(f"--server {url!r}: expected http(s)://host:port")
        self.url, self.host, self.https = url, u.hostname, u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        self.token, self.device, self.timeout_s = token, device, timeout_s
        self.max_offline_s, self.log, self.sleep = max_offline_s, log, sleep
        self.ctx = None
        if self.https:
            self.ctx = ssl.create_default_context(cafile=cafile)
        self.conn = None
        self.rng = random.Random(seed)
        self.bytes_sent = 0

    def _connection(self):
        if self.conn is None:
            if self.https:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                                        timeout=self.timeout_s)
            else:
                self.conn = http.client.HTTPConnection(self.host, self.port,
                                                       timeout=self.timeout_s)
        return self.conn

    def _once(self, method: str, path: str, body: bytes | None, headers: dict):
        conn = self._connection()
        h = {"Authorization": f"Bearer {self.token}", **headers}
        if body is not None:
            h["Content-Length"] = str(len(body))
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        if r.getheader("Connection", "").lower() == "close":
            self.close()
        self.bytes_sent += len(body or b"")
        return r.status, r, data

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        """(status, response, body) — retried on connection failures and 429."""
        t_first_fail, attempt = None, 0
        while True:
            try:
                status, r, data = self._once(method, path, body, headers or {})
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise MobiletuneError(f"{self.url}: the server's TLS certificate does not "
                                          f"verify ({e.reason})") from None
                why = f"{type(e).__name__}: {e}"
            else:
                if status == 401:
                    raise MobiletuneError(f"{self.url}: unauthorized (401): "
                                          f"{_error(data)} — check the token")
                if status != 429:
                    return status, r, data
                why = f"the server is busy (429: {_error(data)})"
                wait = float(r.getheader("Retry-After") or 1)
                self.sleep(wait)
                continue
            now = time.monotonic()
            t_first_fail = t_first_fail or now
            if now - t_first_fail > self.max_offline_s:
                raise ServerUnavailable(f"{self.url}: no answer for {now - t_first_fail:.0f} s "
                                        f"({why})")
            wait = min(30.0, 0.5 * 2 ** attempt) * (0.5 + self.rng.random())
            attempt += 1
            self.log(f"side: {self.url} unreachable ({why}); retrying in {wait:.1f} s")
            self.sleep(wait)

    def json(self, method: str, path: str, obj=None) -> dict:
        body = None if obj is None else json.dumps(obj).encode()
        status, _, data = self.request(method, path, body,
                                       {"Content-Type": "application/json"} if body else {})
        if status == 409:
            raise MobiletuneError(f"{self.url}: refused (409): {_error(data)}")
        if status != 200:
            raise MobiletuneError(f"{self.url}: {method} {path} answered {status}: {_error(data)}")
        return json.loads(data)

    def open_session(self, recipe: str, side: str, bundle: str) -> dict:
        return self.json("POST", P.SESSIONS, {"device": self.device, "recipe": recipe,
                                              "side": side, "bundle": bundle})

    def status(self) -> dict:
        return self.json("GET", P.status_path(self.device))

    def put_batch(self, seq: int, payload: bytes) -> dict:
        status, _, data = self.request("PUT", P.batch_path(self.device, seq), payload,
                                       {P.SHA_HEADER: P.sha256(payload),
                                        "Content-Type": "application/octet-stream"})
        if status == 202:
            return json.loads(data)
        if status == 409:
            obj = json.loads(data)
            raise OutOfOrder(f"seq {seq}: {obj.get('error')}", obj)
        raise MobiletuneError(f"{self.url}: batch {seq} refused ({status}): {_error(data)}")

    def side_weights(self) -> bytes:
        status, _, data = self.request("GET", P.side_path(self.device))
        if status != 200:
            raise MobiletuneError(f"{self.url}: side weights: {status} {_error(data)}")
        return data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _error(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error"))
    except (ValueError, AttributeError):
        return data[:200].decode("utf-8", "replace")
