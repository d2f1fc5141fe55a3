"""The trainer's clocks: ``SimClock`` (simulated seconds: a battery trace is replayed on it,
nothing waits; ``sleep`` and ``advance`` add) and ``RealClock`` (monotonic seconds since
start; ``sleep`` really sleeps, ``advance`` is a no-op because measured time has passed)."""

from __future__ import annotations

import math
import time


def _num_ok(s) -> bool:
    return not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) and s >= 0


def _nonneg(s: float) -> float:
    if not _num_ok(s):
        raise ValueError(f"a duration must be finite and >= 0, got {s!r}")
    return float(s)


class SimClock:
    """Simulated seconds: nothing waits; the trainer advances it by measured compute time
    and sleeps (``sleep`` and ``advance`` are the same)."""
    def __init__(self, start: float = 0.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += _nonneg(s)

    sleep = advance


class RealClock:
    """Monotonic seconds since construction; ``advance`` is a no-op (the time has passed)."""
    def __init__(self):
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def sleep(self, s: float) -> None:
        time.sleep(_nonneg(s))

    def advance(self, s: float) -> None:
        _nonneg(s)
