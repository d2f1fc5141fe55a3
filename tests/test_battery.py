"""Battery providers (fake sysfs trees, a fake termux-battery-status, traces), clocks,
``--battery`` selection and the energy meter; no device, no real waiting."""

import json
import sys
import time

import pytest

from mobiletune.runtime.energy import battery as B
from mobiletune.runtime.energy import clocks as C
from mobiletune.runtime.energy.meter import EnergyMeter
from mobiletune.runtime.energy.scheduler import Reading
from tests.helpers import DESKTOP_FRAMEWORKS, imported


def supply(root, name, **files):
    d = root / name
    d.mkdir(parents=True)
    for k, v in files.items():
        (d / k).write_text(f"{v}\n")
    return d


# ---- sysfs -------------------------------------------------------------------------------
def test_sysfs_reads_and_converts_units(tmp_path):
    bat = supply(tmp_path, "battery", type="Battery", capacity=57, status="Discharging", temp=312,
                 current_now=-1234000, voltage_now=3850000)
    supply(tmp_path, "usb", type="USB", online=0)
    r = B.SysfsBattery(tmp_path).read(12.5)
    assert r == Reading(time=12.5, level=57.0, charging=False, temperature_c=pytest.approx(31.2),
                        current_a=pytest.approx(-1.234), voltage_v=pytest.approx(3.85),
                        source=f"sysfs:{bat}")


def test_sysfs_missing_and_bad_files_are_none(tmp_path):
    supply(tmp_path, "BAT0", type="Battery", capacity="abc", current_now=0)
    r = B.SysfsBattery(tmp_path).read(0.0)
    assert (r.level, r.charging, r.temperature_c, r.current_a, r.voltage_v) == (None,) * 5


@pytest.mark.parametrize("status,online,expected", [
    ("Charging", None, True), ("Full", None, True), ("Discharging", "1", False),
    ("Not charging", "1", True), ("Not charging", "0", False), ("Not charging", None, None),
    ("Unknown", None, None), (None, "1", True)])
def test_sysfs_charging_from_status_and_chargers(tmp_path, status, online, expected):
    files = {"type": "Battery", "capacity": 50}
    if status is not None:
        files["status"] = status
    supply(tmp_path, "battery", **files)
    if online is not None:
        supply(tmp_path, "ac", type="Mains", online=online)
    assert B.SysfsBattery(tmp_path).read(0.0).charging is expected


def test_sysfs_finds_the_system_battery_only(tmp_path):
    supply(tmp_path, "hid-stylus-battery", type="Battery", scope="Device", capacity=5)
    supply(tmp_path, "usb", type="USB", online=1)
    assert B.find_battery(tmp_path) is None
    assert B.find_battery(tmp_path / "absent") is None
    with pytest.raises(B.BatteryError, match="no readable battery"):
        B.SysfsBattery(tmp_path)
    supply(tmp_path, "bms", type="Battery", capacity=70)
    supply(tmp_path, "battery", type="Battery", capacity=80)
    assert B.find_battery(tmp_path).name == "battery"
    assert B.SysfsBattery(tmp_path).read(0.0).level == 80


# ---- termux ------------------------------------------------------------------------------
TERMUX_JSON = {"present": True, "health": "GOOD", "plugged": "UNPLUGGED", "status": "DISCHARGING",
               "temperature": "31,5", "voltage": 3850, "current": -250000, "percentage": 64,
               "level": 64, "scale": 100}


def fake_command(tmp_path, body, name="termux-battery-status"):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return p


def test_termux_parses_json_from_a_command(tmp_path):
    cmd = fake_command(tmp_path, f"echo '{json.dumps(TERMUX_JSON)}'")
    r = B.TermuxBattery((str(cmd),)).read(3.0)
    assert (r.time, r.level, r.charging, r.source) == (3.0, 64.0, False, "termux")
    assert r.temperature_c == pytest.approx(31.5)
    assert r.current_a == pytest.approx(-0.25) and r.voltage_v == pytest.approx(3.85)


@pytest.mark.parametrize("fields,expected", [
    ({"plugged": "PLUGGED_USB", "status": "NOT_CHARGING"}, {"charging": True}),
    ({"plugged": None, "status": "FULL"}, {"charging": True}),
    ({"plugged": None, "status": "UNKNOWN"}, {"charging": None}),
    ({"percentage": None, "level": 30, "scale": 200}, {"level": 15.0}),
    ({"temperature": -0.1, "current": 0, "voltage": -1}, {"temperature_c": None, "current_a": None,
                                                         "voltage_v": None}),
    ({"temperature": 40.25}, {"temperature_c": 40.25}),
])
def test_termux_fields(fields, expected):
    out = json.dumps({**TERMUX_JSON, **fields})
    r = B.TermuxBattery(runner=lambda cmd, timeout: out).read(0.0)
    for k, v in expected.items():
        assert getattr(r, k) == v, k


@pytest.mark.parametrize("out,match", [("not json", "no JSON"), ('{"error": "denied"}', "denied"),
                                       ("[1, 2]", "answered")])
def test_termux_bad_answers_raise(out, match):
    with pytest.raises(B.BatteryError, match=match):
        B.TermuxBattery(runner=lambda cmd, timeout: out).read(0.0)


def test_termux_command_failures_raise(tmp_path):
    with pytest.raises(B.BatteryError, match="exited 3.*boom"):
        B.TermuxBattery((str(fake_command(tmp_path, "echo boom >&2; exit 3", "fail")),)).read(0.0)
    with pytest.raises(B.BatteryError, match="not found"):
        B.TermuxBattery((str(tmp_path / "nope"),)).read(0.0)
    slow = fake_command(tmp_path, f"exec {sys.executable} -c 'import time; time.sleep(30)'", "slow")
    t0 = time.monotonic()
    with pytest.raises(B.BatteryError, match="no answer in 0.5s"):
        B.TermuxBattery((str(slow),), timeout_s=0.5).read(0.0)
    assert time.monotonic() - t0 < 10


# ---- traces ------------------------------------------------------------------------------
def test_trace_csv_is_stepwise(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("# a comment\ntime,level,charging,temperature,current_a,voltage_v\n"
                 "10,90,false,30,-0.5,3.9\n20,60,,33.5,,\n\n30,15,true,36,1.2,4.2\n")
    tb = B.TraceBattery(p)
    assert tb.read(5.0) == Reading(time=5.0, source=f"trace:{p}")  # before the first row
    r = tb.read(10.0)
    assert (r.time, r.level, r.charging, r.temperature_c, r.current_a, r.voltage_v) == \
        (10.0, 90.0, False, 30.0, -0.5, 3.9)
    r = tb.read(29.999)
    assert (r.level, r.charging, r.temperature_c, r.current_a) == (60.0, None, 33.5, None)
    assert tb.read(1e9).charging is True and tb.end_time == 30.0


def test_trace_jsonl(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"time": 0, "level": 50, "charging": false, "temperature_c": 30}\n'
                 '{"time": 5.5, "level": null, "charging": 1, "screen_on": true, "idle": "no"}\n')
    tb = B.TraceBattery(p)
    assert tb.read(0).level == 50 and tb.read(0).charging is False
    r = tb.read(6)
    assert (r.level, r.charging, r.temperature_c, r.screen_on, r.idle) == (None, True, None, True, False)


@pytest.mark.parametrize("name,text,match", [
    ("a.csv", "time,level\n0,50\n0,40\n", r"a\.csv:3: time '0' missing or not after"),
    ("a.csv", "time,level\n0,50\n5,120\n", r"a\.csv:3: level='120' is not a number in \[0, 100\]"),
    ("a.csv", "time,charging\n0,maybe\n", r"a\.csv:2: charging='maybe' is not true/false"),
    ("a.csv", "time,lvl\n0,50\n", r"a\.csv:2: unknown column 'lvl'"),
    ("a.csv", "time,level\n0,50,1\n", r"a\.csv:2: 3 cells; the header has 2"),
    ("a.csv", "level\n50\n", r"a\.csv:2: time None missing"),
    ("a.csv", "time,level\n", "no rows"),
    ("a.csv", "", "no rows"),
    ("a.csv", "time,level\nsoon,50\n", r"a\.csv:2: time='soon'"),
    ("a.jsonl", '{"time": 0}\n{"time": 1,\n', r"a\.jsonl:2: not JSON"),
    ("a.jsonl", '{"time": 0}\n[1]\n', r"a\.jsonl:2: expected a JSON object"),
])
def test_trace_errors_name_file_and_line(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(B.BatteryError, match=match):
        B.TraceBattery(p)


def test_trace_missing_file(tmp_path):
    with pytest.raises(B.BatteryError, match="cannot read"):
        B.TraceBattery(tmp_path / "absent.csv")


# ---- clocks ------------------------------------------------------------------------------
def test_sim_clock_never_waits():
    c = C.SimClock()
    t0 = time.monotonic()
    c.sleep(3600)
    c.advance(2.5)
    assert c.now() == 3602.5 and time.monotonic() - t0 < 1
    assert C.SimClock(start=7).now() == 7
    with pytest.raises(ValueError):
        c.sleep(-1)
    with pytest.raises(ValueError):
        c.advance(float("nan"))


def test_real_clock_advance_is_a_no_op():
    c = C.RealClock()
    a = c.now()
    c.advance(1000)
    c.sleep(0.01)
    b = c.now()
    assert 0.005 < b - a < 5
    with pytest.raises(ValueError):
        c.sleep(-1)


# ---- --battery selection -----------------------------------------------------------------
def test_open_provider_explicit(tmp_path, monkeypatch):
    p, desc = B.open_provider("none")
    assert isinstance(p, B.NoBattery) and desc.startswith("none")
    r = p.read(4.0)
    assert r.time == 4.0 and (r.level, r.charging, r.temperature_c) == (None, None, None)
    trace = tmp_path / "t.csv"
    trace.write_text("time,level\n0,50\n")
    p, desc = B.open_provider(f"trace:{trace}")
    assert isinstance(p, B.TraceBattery) and str(trace) in desc
    with pytest.raises(B.BatteryError, match="expected auto, sysfs"):
        B.open_provider("acpi")
    with pytest.raises(B.BatteryError, match="no readable battery"):
        B.open_provider("sysfs", sysfs_root=tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(B.BatteryError, match="not on PATH"):
        B.open_provider("termux")
    fake_command(tmp_path, f"echo '{json.dumps(TERMUX_JSON)}'")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    p, desc = B.open_provider("termux", sysfs_root=tmp_path)
    assert isinstance(p, B.TermuxBattery) and p.read(0).level == 64


def test_open_provider_auto_order(tmp_path, monkeypatch):
    sysfs = tmp_path / "ps"
    sysfs.mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    p, desc = B.open_provider("auto", sysfs_root=sysfs)
    assert isinstance(p, B.NoBattery) and "no battery under" in desc
    fake_command(tmp_path, "exit 1")  # installed, but the Termux:API app is missing
    p, desc = B.open_provider("auto", sysfs_root=sysfs)
    assert isinstance(p, B.NoBattery) and "exited 1" in desc
    fake_command(tmp_path, f"echo '{json.dumps(TERMUX_JSON)}'")
    p, desc = B.open_provider("auto", sysfs_root=sysfs)
    assert isinstance(p, B.TermuxBattery) and desc.startswith("termux")
    supply(sysfs, "battery", type="Battery", capacity=42)
    p, desc = B.open_provider("auto", sysfs_root=sysfs)
    assert isinstance(p, B.SysfsBattery) and desc.startswith("sysfs") and p.read(0).level == 42


# ---- energy --------------------------------------------------------------------------------
def rd(t, i=None, v=None, charging=False):
    return Reading(time=t, charging=charging, current_a=i, voltage_v=v)


def test_energy_meter_trapezoid_and_honest_none():
    m = EnergyMeter()
    assert m.step(rd(0, -0.5, 4.0), rd(10, -1.0, 4.0)) == pytest.approx(30.0)  # (2 W + 4 W) / 2 * 10 s
    assert m.step(rd(10, 0.5, 4.0), rd(12, 0.5, 4.0)) == pytest.approx(4.0)  # sign convention ignored
    assert m.step(rd(0, -0.5, None), rd(1, -0.5, 4.0)) is None
    assert m.step(rd(0, -0.5, 4.0), rd(1, -0.5, 4.0, charging=True)) is None
    assert m.step(rd(0, 0.0, 4.0), rd(1, -0.5, 4.0)) is None
    assert m.step(rd(5, -0.5, 4.0), rd(5, -0.5, 4.0)) is None
    assert m.step(Reading(time=0), Reading(time=1)) is None
    assert (m.total_j, m.measured, m.unmeasured) == (pytest.approx(34.0), 2, 5)


# ---- the phone side's imports --------------------------------------------------------------
def test_imports_only_stdlib_and_numpy():
    assert imported("import mobiletune.runtime.energy.scheduler, mobiletune.runtime.energy.battery, "
                    "mobiletune.runtime.energy.clocks, mobiletune.runtime.energy.meter",
                    DESKTOP_FRAMEWORKS + ("numpy",)) == []
