"""The energy scheduler's policy as a table: reading (+ previous decision) -> decision."""

import json

import pytest

from mobiletune.errors import MobiletuneError
from mobiletune.runtime.energy.scheduler import Decision, Reading, Thresholds, decide

V = (1, 2, 4, 8)  # smallest 1, middle 4 (sorted[len // 2]), biggest 8
TH = Thresholds()
SLEEP = TH.throttle_sleep_s
HEAT = Decision("pause", 1, reason="hot", holds=("heat",))
BATT = Decision("pause", 1, reason="low", holds=("battery",))
BOTH = Decision("pause", 1, reason="both", holds=("heat", "battery"))
STOP = Decision("stop", 1, reason="empty", holds=("battery",))
RUN = Decision("run", 8, reason="ok")


def R(level=None, charging=None, temp=None, **kw):
    return Reading(time=0.0, level=level, charging=charging, temperature_c=temp, **kw)


# (id, reading, previous, threshold overrides, expected action, variant, sleep, holds)
TABLE = [
    ("full", R(90, False, 30), None, {}, "run", 8, 0.0, ()),
    ("high-boundary", R(70, False, 30), None, {}, "run", 8, 0.0, ()),
    ("medium", R(69, False, 30), None, {}, "run", 4, 0.0, ()),
    ("medium-boundary", R(50, False, 30), None, {}, "run", 4, 0.0, ()),
    ("low-small", R(45, False, 30), None, {}, "run", 1, 0.0, ()),
    ("low-throttled", R(39, False, 30), None, {}, "run", 1, SLEEP, ()),
    ("pause-band-entered-from-above", R(22, False, 30), RUN, {}, "run", 1, SLEEP, ()),
    ("pause", R(19, False, 30), None, {}, "pause", None, None, ("battery",)),
    ("stop", R(4, False, 30), None, {}, "stop", None, None, ("battery",)),
    ("charging-overrides-stop", R(4, True, 30), None, {}, "run", 8, 0.0, ()),
    ("charging-overrides-low", R(10, True, 30), BATT, {}, "run", 8, 0.0, ()),
    ("all-unknown-full-speed", R(), None, {}, "run", 8, 0.0, ()),
    ("unknown-charging-low-level-pauses", R(15, None, None), None, {}, "pause", None, None,
     ("battery",)),
    ("unknown-level-hot-pauses", R(None, None, 43), None, {}, "pause", None, None, ("heat",)),
    ("hot-boundary-is-warm", R(90, False, 42.0), None, {}, "run", 8, SLEEP, ()),
    ("warm-throttles", R(90, False, 39), None, {}, "run", 8, SLEEP, ()),
    ("hot-overrides-charging", R(90, True, 43), None, {}, "pause", None, None, ("heat",)),
    ("heat-hysteresis-holds", R(90, False, 40), HEAT, {}, "pause", None, None, ("heat",)),
    ("heat-released-below-cool", R(90, False, 37.9), HEAT, {}, "run", 8, 0.0, ()),
    ("heat-unknown-temp-releases", R(90, False, None), HEAT, {}, "run", 8, 0.0, ()),
    ("battery-hysteresis-holds", R(22, False, 30), BATT, {}, "pause", None, None, ("battery",)),
    ("battery-released-at-resume", R(25, False, 30), BATT, {}, "run", 1, SLEEP, ()),
    ("battery-hold-not-latched-by-heat", R(22, False, 30), HEAT, {}, "run", 1, SLEEP, ()),
    ("both-held-heat-left", R(22, False, 40), BOTH, {}, "pause", None, None, ("heat", "battery")),
    ("both-held-battery-left", R(22, False, 30), BOTH, {}, "pause", None, None, ("battery",)),
    ("stop-is-sticky", R(6, False, 30), STOP, {}, "stop", None, None, ("battery",)),
    ("stop-released-by-charging", R(6, True, 30), STOP, {}, "run", 8, 0.0, ()),
    ("only-when-charging-pauses", R(90, False, 30), None, {"only_when_charging": True}, "pause",
     None, None, ()),
    ("only-when-charging-unknown-runs", R(90, None, 30), None, {"only_when_charging": True}, "run",
     8, 0.0, ()),
    ("screen-on-pauses", R(90, False, 30, screen_on=True), None, {"pause_when_screen_on": True},
     "pause", None, None, ()),
    ("screen-unknown-runs", R(90, False, 30), None, {"pause_when_screen_on": True}, "run", 8, 0.0,
     ()),
    ("custom-thresholds", R(90, False, 30), None, {"mid_variant_below": 95, "throttle_below": 91},
     "run", 4, SLEEP, ()),
]


@pytest.mark.parametrize("reading,previous,over,action,variant,sleep,holds",
                         [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_policy_table(reading, previous, over, action, variant, sleep, holds):
    th = Thresholds.from_dict({**TH.to_dict(), **over})
    d = decide(reading, th, V, previous)
    assert d.action == action, d
    assert d.reason
    assert set(d.holds) == set(holds), d
    if action == "run":
        assert (d.variant, d.sleep_s) == (variant, sleep), d
        assert d.variant in V


def test_single_variant_and_order_do_not_matter():
    assert decide(R(45, False), TH, (4,)).variant == 4
    assert decide(R(60, False), TH, (8, 1, 2)).variant == 2
    assert decide(R(90, False), TH, (2, 8)).variant == 8
    with pytest.raises(ValueError):
        decide(R(90), TH, ())
    with pytest.raises(ValueError):
        decide(R(90), TH, (0, 2))


def test_drain_with_jitter_pauses_once_and_never_flaps():
    levels = [100 - i for i in range(81)] + [19, 21, 20, 22, 19, 24, 23, 24, 25, 26]
    prev, actions, variants = None, [], []
    for lv in levels:
        prev = decide(R(lv, False, 30), TH, V, prev)
        actions.append(prev.action)
        if prev.action == "run":
            variants.append(prev.variant)
    assert variants[:81] == sorted(variants[:81], reverse=True)
    first = actions.index("pause")
    assert levels[first] == 19
    assert all(a == "pause" for a in actions[first:-2]) and actions[-2:] == ["run", "run"]


def test_thresholds_round_trip_and_validation():
    d = TH.to_dict()
    assert Thresholds.from_dict(json.loads(json.dumps(d))) == TH
    assert Thresholds.from_dict({}) == TH == Thresholds.from_dict(None)
    assert (TH.pause_below, TH.resume_above, TH.hot_c, TH.cool_c, TH.stop_below) == (20, 25, 42, 38, 5)
    with pytest.raises(MobiletuneError, match="paws_below"):
        Thresholds.from_dict({"paws_below": 10})
    with pytest.raises(MobiletuneError, match="resume_above"):
        Thresholds(pause_below=30, resume_above=25)
    with pytest.raises(MobiletuneError, match="cool_c"):
        Thresholds(cool_c=45)
    with pytest.raises(MobiletuneError, match="duty_cycle"):
        Thresholds(duty_cycle=0)
    with pytest.raises(MobiletuneError, match="number"):
        Thresholds(hot_c="hot")
    with pytest.raises(MobiletuneError, match="true or false"):
        Thresholds(only_when_charging="yes")


def test_sleep_after_duty_cycle():
    d = decide(R(30, False), TH, V)
    assert d.sleep_s == SLEEP and d.duty_cycle == TH.duty_cycle
    assert d.sleep_after(0.5) == SLEEP  # short micro-steps: the fixed sleep
    assert d.sleep_after(10.0) == pytest.approx(10.0)  # duty 0.5: as long again
    full = decide(R(90, False), TH, V)
    assert full.sleep_after(10.0) == 0.0
    with pytest.raises(ValueError):
        Decision("sprint", 1)


def test_decide_is_pure():
    r = R(45, False, 40)
    assert decide(r, TH, V, BATT) == decide(r, TH, V, BATT)
    assert BATT.holds == ("battery",) and r.level == 45
