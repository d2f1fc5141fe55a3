"""Energy-aware scheduling: a pure policy from one battery/thermal reading to what the
trainer does next (standard library only; the readings come from ``runtime.battery``).

``decide(reading, thresholds, variants, previous)`` is called before every optimizer step
(and every poll while paused) and returns a ``Decision``: ``run`` with a micro-batch
``variant`` and a ``sleep_s`` after each micro-step, ``pause`` (checkpoint, poll, resume
later) or ``stop`` (checkpoint and exit). It reads no clock and no device: hysteresis
comes from ``previous.holds``, so the policy is a table (``tests/test_scheduler.py``).

Default thresholds (``Thresholds``; stored in the bundle manifest / recipe as a dict):

    condition (first match wins)                         action  variant   sleep
    level < stop_below=5 %, not charging                 stop    -         -
    temp > hot_c=42 C (held until temp < cool_c=38 C)    pause   -         -
    level < pause_below=20 %, not charging
        (held until level >= resume_above=25 % or charging)  pause -       -
    only_when_charging and charging is False             pause   -         -
    pause_when_screen_on and screen_on is True           pause   -         -
    charging                                             run     biggest   0 *
    level >= mid_variant_below=70 %                      run     biggest   0 *
    level >= low_variant_below=50 %                      run     middle    0 *
    level >= throttle_below=40 %                         run     smallest  0 *
    level < throttle_below                               run     smallest  throttle
    level unknown                                        run     biggest   0 *
    * temp >= warm_c=39 C adds the throttle to any run row.

The throttle is ``sleep_s = throttle_sleep_s`` (2 s, MobileFineTuner's low rate of
0.5 steps/s) after every micro-step, and ``duty_cycle`` (0.5): ``Decision.sleep_after(
compute_s)`` stretches the sleep so that computing takes at most that fraction of the time.

Unknown values (None; Android often reports none, or zeros that providers map to None)
never pause by themselves: an unknown level skips every battery row (full speed, as with
``--battery none``), an unknown temperature skips the heat rows, and an unknown
``screen_on`` skips that row. An unknown ``charging`` with a *known* level counts as not
charging: the known low level is what pauses, and a phone that is in fact charging comes
back above ``resume_above``. ``only_when_charging`` pauses only on a reported False.
``idle``, current and voltage are carried for metrics and energy; the policy ignores them.

Variants: every variant yields the same optimizer step (the trainer accumulates
effective_batch / k micro-batches of size k), so the choice is only about cost. Bigger
micro-batches run faster (fewer interpreter calls, better kernel use) and are used when
energy is plentiful; smaller ones have lower peak memory and shorter, lower-power bursts,
so the throttle's sleeps interleave finely with compute and the phone heats less. Medium
battery takes the middle variant (``sorted(variants)[len // 2]``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from mobiletune.errors import MobiletuneError

ACTIONS = ("run", "pause", "stop")


@dataclass(frozen=True)
class Reading:
    """One sample. ``time`` in seconds (the clock the trainer uses), ``level`` in %,
    ``temperature_c`` the battery's; current in A (sign as the device reports it), voltage
    in V. None means unknown."""
    time: float
    level: float | None = None
    charging: bool | None = None
    temperature_c: float | None = None
    screen_on: bool | None = None
    idle: bool | None = None
    current_a: float | None = None
    voltage_v: float | None = None
    source: str = ""


@dataclass(frozen=True)
class Thresholds:
    """Battery levels in %, temperatures in degrees C, sleeps in seconds (see the table)."""
    stop_below: float = 5.0
    pause_below: float = 20.0
    resume_above: float = 25.0
    throttle_below: float = 40.0
    low_variant_below: float = 50.0
    mid_variant_below: float = 70.0
    hot_c: float = 42.0
    cool_c: float = 38.0
    warm_c: float = 39.0
    throttle_sleep_s: float = 2.0
    duty_cycle: float = 0.5
    only_when_charging: bool = False
    pause_when_screen_on: bool = False

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(v, bool):
                    raise MobiletuneError(f"thresholds: {f.name} must be true or false, not {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise MobiletuneError(f"thresholds: {f.name} must be a number, not {v!r}")
        if not (0 <= self.stop_below <= self.pause_below < self.resume_above <= 100):
            raise MobiletuneError("thresholds: need 0 <= stop_below <= pause_below < "
                                  "resume_above <= 100")
        if not (self.pause_below <= self.throttle_below and self.cool_c < self.hot_c
                and self.warm_c <= self.hot_c and self.low_variant_below <= self.mid_variant_below):
            raise MobiletuneError("thresholds: need pause_below <= throttle_below, cool_c < hot_c, "
                                  "warm_c <= hot_c, low_variant_below <= mid_variant_below")
        if self.throttle_sleep_s < 0 or not 0 < self.duty_cycle <= 1:
            raise MobiletuneError("thresholds: need throttle_sleep_s >= 0 and 0 < duty_cycle <= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Thresholds:
        """Missing keys take the defaults; unknown keys are an error (a typo would otherwise
        silently keep a default)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MobiletuneError(f"thresholds: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class Decision:
    """``variant`` matters for ``run`` (pause/stop carry the smallest); ``sleep_s`` follows
    each micro-step; ``holds``: the pauses latched by hysteresis ("battery", "heat"), read
    back by the next ``decide`` through ``previous``."""
    action: str
    variant: int
    sleep_s: float = 0.0
    reason: str = ""
    duty_cycle: float = 1.0
    holds: tuple[str, ...] = ()

    def __post_init__(self):
        if self.action not in ACTIONS:
            raise ValueError(f"action {self.action!r} not in {ACTIONS}")

    def sleep_after(self, compute_s: float) -> float:
        """The sleep after a micro-step that took ``compute_s``: at least ``sleep_s``, and
        enough that compute is at most ``duty_cycle`` of the wall time."""
        if self.action != "run":
            return 0.0
        return max(self.sleep_s, max(compute_s, 0.0) * (1.0 / self.duty_cycle - 1.0))


def _check_variants(variants) -> tuple[int, ...]:
    vs = tuple(sorted(set(variants)))
    if not vs or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in vs):
        raise ValueError(f"variants must be positive ints, got {variants!r}")
    return vs


def decide(reading: Reading, thresholds: Thresholds, variants: tuple[int, ...],
           previous: Decision | None = None) -> Decision:
    """The table in the module docstring, as a pure function."""
    t = thresholds
    vs = _check_variants(variants)
    small, middle, big = vs[0], vs[len(vs) // 2], vs[-1]
    level, temp = reading.level, reading.temperature_c
    charging = reading.charging is True
    held = set(previous.holds) if previous is not None else set()
    was_stopped = previous is not None and previous.action == "stop"

    battery_known = level is not None and not charging
    if battery_known and (level < t.stop_below or (was_stopped and level < t.resume_above)):
        why = (f"battery {level:g}% < {t.stop_below:g}%" if level < t.stop_below
               else f"battery {level:g}% < {t.resume_above:g}% after a stop")
        return Decision("stop", small, reason=why + ", not charging", holds=("battery",))

    holds, why = [], []
    if temp is not None:
        if temp > t.hot_c:
            holds.append("heat")
            why.append(f"hot {temp:g}C > {t.hot_c:g}C")
        elif "heat" in held and temp >= t.cool_c:
            holds.append("heat")
            why.append(f"cooling {temp:g}C >= {t.cool_c:g}C")
    if battery_known:
        if level < t.pause_below:
            holds.append("battery")
            why.append(f"battery {level:g}% < {t.pause_below:g}%, not charging")
        elif "battery" in held and level < t.resume_above:
            holds.append("battery")
            why.append(f"battery {level:g}% < resume {t.resume_above:g}%, not charging")
    if t.only_when_charging and reading.charging is False:
        why.append("not charging (only_when_charging)")
    if t.pause_when_screen_on and reading.screen_on is True:
        why.append("screen on (pause_when_screen_on)")
    if why:
        return Decision("pause", small, reason="; ".join(why), holds=tuple(holds))

    if charging:
        variant, why = big, ["charging"]
    elif level is None:
        variant, why = big, ["battery unknown"]
    elif level >= t.mid_variant_below:
        variant, why = big, [f"battery {level:g}%"]
    elif level >= t.low_variant_below:
        variant, why = middle, [f"battery {level:g}% < {t.mid_variant_below:g}%"]
    else:
        variant, why = small, [f"battery {level:g}% < {t.low_variant_below:g}%"]
    throttle = False
    if not charging and level is not None and level < t.throttle_below:
        throttle = True
        why.append(f"throttle < {t.throttle_below:g}%")
    if temp is not None and temp >= t.warm_c:
        throttle = True
        why.append(f"warm {temp:g}C >= {t.warm_c:g}C")
    if throttle:
        return Decision("run", variant, t.throttle_sleep_s, ", ".join(why), t.duty_cycle)
    return Decision("run", variant, 0.0, ", ".join(why))
