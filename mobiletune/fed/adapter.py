"""The wire contract between phone and server: a LoRA adapter as a flat dict of float32
arrays named as PEFT names them (``base_model.model.<module>.lora_{A,B}.weight``), the names
a Flower ``ArrayRecord`` carries. numpy and the bundle contract only (the phone imports it).

``validate`` is the server's gate: an update with a missing or extra key, a wrong shape or
dtype, or a non-finite value is rejected with one reason line and never aggregated.
"""

from __future__ import annotations

import math

import numpy as np

from mobiletune.runtime.bundle import ACC, OPT, TRAINABLE

PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


class UpdateRejected(ValueError):
    """A client's update that the server will not aggregate (the message is the reason)."""


def lora_scale(lora: dict, r: int | None = None) -> float:
    """PEFT's scaling for a resolved LoRA config dict: alpha/r, or alpha/sqrt(r) (rsLoRA)."""
    r = int(lora["r"] if r is None else r)
    return float(lora["alpha"]) / (math.sqrt(r) if lora.get("use_rslora") else r)


def to_wire(state_or_adapter: dict) -> dict[str, np.ndarray]:
    """Bundle state (``trainable/<name>``) or an adapter (``<name>``) -> PEFT wire names."""
    out = {}
    for k, v in state_or_adapter.items():
        if k.startswith(TRAINABLE):
            k = k[len(TRAINABLE):]
        elif k.startswith((ACC, OPT)) or "/" in k:
            continue
        if k.endswith((A_SUFFIX, B_SUFFIX)):
            out[PREFIX + k] = np.array(v, np.float32)
    return out


def to_state_names(wire: dict) -> dict[str, np.ndarray]:
    """PEFT wire names -> the bundle's ``trainable/<name>`` state names."""
    return {TRAINABLE + k[len(PREFIX):]: v for k, v in wire.items()}


def modules(wire: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module name -> (A (r, in), B (out, r)); every module must have both factors."""
    mods: dict[str, dict] = {}
    for k, v in wire.items():
        for suf, which in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
            if k.endswith(suf):
                mods.setdefault(k[: -len(suf)], {})[which] = v
                break
        else:
            raise UpdateRejected(f"key {k!r} is not a LoRA factor")
    for m, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise UpdateRejected(f"module {m!r} lacks lora_{'A' if 'A' not in ab else 'B'}")
    return {m: (ab["A"], ab["B"]) for m, ab in sorted(mods.items())}


def shapes(wire: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(np.shape(v)) for k, v in wire.items()}


def validate(update: dict, expected: dict[str, tuple[int, ...]], where: str = "update") -> dict:
    """``update`` as float32 arrays if it has exactly the keys and shapes of ``expected``
    and only finite values; else ``UpdateRejected`` naming the first offending key."""
    missing = sorted(set(expected) - set(update))
    if missing:
        raise UpdateRejected(f"{where}: key {missing[0]!r} is missing ({len(missing)} missing)")
    extra = sorted(set(update) - set(expected))
    if extra:
        raise UpdateRejected(f"{where}: key {extra[0]!r} is not part of the adapter")
    out = {}
    for k in sorted(expected):
        a = np.asarray(update[k])
        if tuple(a.shape) != tuple(expected[k]):
            raise UpdateRejected(f"{where}: key {k!r} has shape {list(a.shape)}, expected "
                                 f"{list(expected[k])}")
        if a.dtype != np.float32:
            raise UpdateRejected(f"{where}: key {k!r} has dtype {a.dtype}, expected float32")
        if not np.isfinite(a).all():
            raise UpdateRejected(f"{where}: key {k!r} has {int((~np.isfinite(a)).sum())} "
                                 f"non-finite values")
        out[k] = a
    return out


def with_rank(expected: dict, rank: int) -> dict:
    """``expected`` shapes at another LoRA rank (A: (r, in), B: (out, r))."""
    out = {}
    for k, s in expected.items():
        out[k] = (rank, s[1]) if k.endswith(A_SUFFIX) else (s[0], rank)
    return out


def num_bytes(wire: dict) -> int:
    return int(sum(np.asarray(v).nbytes for v in wire.values()))
