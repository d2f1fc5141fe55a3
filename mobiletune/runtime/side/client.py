"""The phone's side-tuning client: ``mobiletune.io.http.HttpClient`` (HTTP/1.1, TLS, bearer
token, retries with backoff; ``ServerUnavailable`` after ``max_offline_s``, which the
trainer turns into a checkpoint and a stop) with the side-tuning requests. 401 and 409 are
final (``MobiletuneError``)."""

from __future__ import annotations

import json
import time

from mobiletune.errors import MobiletuneError
from mobiletune.io.http import HttpClient, ServerUnavailable, error_text
from mobiletune.runtime.side import protocol as P

__all__ = ["OutOfOrder", "ServerUnavailable", "SideClient"]


class OutOfOrder(MobiletuneError):
    """The server has another sequence than the phone (409 on a batch): resynchronise."""

    def __init__(self, msg: str, status: dict):
        super().__init__(msg)
        self.status = status


class SideClient(HttpClient):
    def __init__(self, url: str, token: str, device: str, cafile=None, timeout_s: float = 60,
                 max_offline_s: float = 600, log=print, sleep=time.sleep, seed: int = 0):
        super().__init__(url, token, cafile, timeout_s, max_offline_s, log, sleep, seed, "side")
        self.device = device

    def open_session(self, recipe: str, side: str, bundle: str) -> dict:
        return self.json("POST", P.SESSIONS, {"device": self.device, "recipe": recipe,
                                              "side": side, "bundle": bundle})

    def status(self) -> dict:
        return self.json("GET", P.status_path(self.device))

    def put_batch(self, seq: int, payload: bytes) -> dict:
        status, data = self.put_bytes(P.batch_path(self.device, seq), payload)
        if status == 202:
            return json.loads(data)
        if status == 409:
            obj = json.loads(data)
            raise OutOfOrder(f"seq {seq}: {obj.get('error')}", obj)
        raise MobiletuneError(f"{self.url}: batch {seq} refused ({status}): {error_text(data)}")

    def side_weights(self) -> bytes:
        status, _, data = self.request("GET", P.side_path(self.device))
        if status != 200:
            raise MobiletuneError(f"{self.url}: side weights: {status} {error_text(data)}")
        return data
