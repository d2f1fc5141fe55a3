"""The side-tuning wire contract, imported by the phone's client and the server alike.

HTTP/1.1 (TLS where configured), JSON for control, safetensors bytes for data; every
request carries ``Authorization: Bearer <the device's token>`` (401 otherwise).

  POST /v1/sessions          {"device", "bundle", "side", "tokenizer"} (sha256s of the
                             bundle's program, side config and tokenizer.json)
        200 status           (409 naming what does not match the server's recipe)
  GET  /v1/sessions/{device}/status                     200 status
  PUT  /v1/sessions/{device}/batches/{seq}              a micro-batch, body = PAYLOAD
        headers Content-Length, X-Content-SHA256 (of the body)
        202 status           stored durably (fsynced) before the answer
        400 {"error"}        a body that is cut, fails its sha256, or has a wrong tensor
        409 {"error", ...}   seq is not received_through + 1 (resume from the status)
        429 {"error"}        the server's queue is full: retry after ``Retry-After`` s
  GET  /v1/sessions/{device}/side  the side weights (safetensors; ETag = their sha256;
                                   304 with If-None-Match)

status = {"received_through": seq, "trained_through": seq, "side_step": n, "queue": n,
"cursor": the data iterator's state after ``received_through`` (or null)}; seqs count the
device's micro-batches from 1. A payload holds ``inputs``, ``targets``, ``loss_mask``
(k, T), the last layer's output ``last.*`` and each tap ``tap.{j}.*`` as ``quantize``
writes them (``x`` for fp32/fp16; ``q`` and ``scale`` for int8/int4), and metadata ``seq``,
``k``, ``cursor`` (JSON).
"""

from __future__ import annotations

import json

from mobiletune.io.http import SHA_HEADER, sha256  # noqa: F401 (the wire's names, re-exported)

VERSION = "/v1"
SESSIONS = f"{VERSION}/sessions"


def status_path(device: str) -> str:
    return f"{SESSIONS}/{device}/status"


def batch_path(device: str, seq: int) -> str:
    return f"{SESSIONS}/{device}/batches/{seq}"


def side_path(device: str) -> str:
    return f"{SESSIONS}/{device}/side"


def side_config_hash(side_config: dict) -> str:
    return sha256(json.dumps(side_config, sort_keys=True).encode())


def tap_name(j: int, part: str) -> str:
    return f"tap.{j}.{part}"


def last_name(part: str) -> str:
    return f"last.{part}"
