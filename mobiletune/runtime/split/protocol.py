"""The SplitLoRA wire contract, imported by the phone and the server alike. It rides on
the side-tuning transport (``mobiletune.io.http``: HTTP/1.1, TLS where configured, a bearer
token on every request (401 otherwise), safetensors bodies with their sha256 in
``X-Content-SHA256``). The token is the device's own: HMAC-SHA256(the server's secret,
``{device}``), handed to each phone in its round's config, so a phone can only act under
its own name (``device_token``).

  PUT  /v1/split/{device}/steps/{step}/micro/{j}   the cut activation of micro-batch j of
        optimizer step ``step``: UP = {"h": float32 (k, T, D) = h_cut, "targets": int32
        (k, T), "loss_mask": float32 (k, T)}
        200 DOWN = {"dh": float32 (k, T, D) = dL/dh_cut, "nll": float32 () summed NLL,
                    "count": float32 () counted tokens}   (L = the summed NLL)
        400 {"error"}  a body that fails its sha256 or has a wrong tensor (named)
        409 {"error"}  another device's optimizer step is open on the server (one at a time)
        A repeat of the last (step, j) (a retry after a lost answer) gets the same answer
        and is not accumulated twice.
  POST /v1/split/{device}/steps/{step}/apply   the server's optimizer step over what the
        device's micro-batches of ``step`` accumulated; 200 {"server_step": n}; a repeat
        of the last applied step is answered without a second update.

The server sees the activations and the targets (the token ids): the labels are not
private in this mode (as in SplitLoRA and SplitFed).
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from mobiletune.io import http as H
from mobiletune.io import safetensors as st

SPLIT = "/v1/split"


def device_name(partition_id: int) -> str:
    """The name a federated client uses on the split endpoint (its data partition)."""
    return f"client-{partition_id:03d}"


def device_token(secret: str, device: str) -> str:
    """The bearer token of ``device``: HMAC-SHA256 of its name under the server's secret."""
    return hmac.new(secret.encode(), device.encode(), hashlib.sha256).hexdigest()


def exchange_path(device: str, step: int, micro: int) -> str:
    return f"{SPLIT}/{device}/steps/{step}/micro/{micro}"


def apply_path(device: str, step: int) -> str:
    return f"{SPLIT}/{device}/steps/{step}/apply"


def up_spec(k: int, seq_len: int, hidden: int) -> dict:
    return {"h": (np.float32, (k, seq_len, hidden)), "targets": (np.int32, (k, seq_len)),
            "loss_mask": (np.float32, (k, seq_len))}


def down_spec(k: int, seq_len: int, hidden: int) -> dict:
    return {"dh": (np.float32, (k, seq_len, hidden)), "nll": (np.float32, ()),
            "count": (np.float32, ())}


def encode(tensors: dict, meta: dict | None = None) -> bytes:
    return st.dumps({k: np.asarray(v, order="C") for k, v in tensors.items()}, meta)


def decode(body: bytes, want: dict, where: str) -> dict:
    """The tensors of a body checked against ``want`` (``H.PayloadError`` naming the first
    one that is missing, extra, of another dtype or shape, or not finite)."""
    try:
        tensors, _ = st.loads(body, where)
    except st.SafetensorsError as e:
        raise H.PayloadError(str(e)) from None
    H.check_payload(tensors, want, where)
    return tensors
