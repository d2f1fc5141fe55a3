"""Energy per training step from two battery readings: |I|·V integrated over the step by
the trapezoid rule when both ends have current and voltage and neither is charging (the
battery current is then consumption minus the charger's input, not consumption), else None
(never a guess)."""

from __future__ import annotations

from mobiletune.runtime.energy.scheduler import Reading


class EnergyMeter:
    """Joules per step from the readings at its start and end; ``total_j`` sums the
    measured steps and ``unmeasured`` counts the others."""
    def __init__(self):
        self.total_j, self.measured, self.unmeasured = 0.0, 0, 0

    @staticmethod
    def power_w(r: Reading) -> float | None:
        ok = r.charging is not True and r.current_a and r.voltage_v is not None
        return abs(r.current_a) * r.voltage_v if ok else None

    def step(self, start: Reading, end: Reading) -> float | None:
        p0, p1, dt = self.power_w(start), self.power_w(end), end.time - start.time
        if p0 is None or p1 is None or not dt > 0:
            self.unmeasured += 1
            return None
        j = 0.5 * (p0 + p1) * dt
        self.total_j += j
        self.measured += 1
        return j
