"""Adapters in Flower records (``flwr.app`` only; the phone imports it): a wire dict
(``mobiletune.fed.adapter``) <-> an ``ArrayRecord``, sorted by name."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(wire: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in sorted(wire.items())})


def from_record(rec: ArrayRecord | None) -> dict:
    return {} if rec is None else {k: a.numpy() for k, a in rec.items()}
