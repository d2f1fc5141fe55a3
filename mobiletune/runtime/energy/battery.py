"""Battery readings for the energy scheduler, clocks, and per-step energy (stdlib only).

Providers have ``read(now) -> scheduler.Reading`` (``now``: the trainer's clock, stored as
``Reading.time``); any value a provider cannot get is None, never a guess:

- ``SysfsBattery``: Linux ``/sys/class/power_supply/<name>`` of ``type`` Battery (scope
  Device, e.g. a stylus, is skipped): ``capacity`` %, ``status`` (Charging/Full -> charging;
  Discharging -> not; Not charging/Unknown -> whether a Mains/USB/Wireless supply is
  ``online``, else None), ``temp`` in 0.1 C, ``current_now`` uA, ``voltage_now`` uV. The
  sign of ``current_now`` varies by vendor (the ABI says positive = discharging, Android's
  BatteryManager the opposite); it is kept as read, and an exact 0 (a common placeholder
  on phones) is None. Android apps usually may not read this tree (SELinux), so ``auto``
  then falls back to Termux.
- ``TermuxBattery``: ``termux-battery-status`` JSON (``percentage``, ``plugged``/``status``,
  ``temperature`` C, ``current`` uA, ``voltage`` mV), run with a timeout (it hangs when the
  Termux:API app is missing); failures raise ``BatteryError``. Placeholders (current 0,
  voltage <= 0, temperature -0.1) become None.
- ``TraceBattery``: a CSV (header) or JSONL trace, columns ``time`` (s, strictly increasing)
  and any of ``level, charging, temperature (or temperature_c), current_a, voltage_v,
  screen_on, idle``; ``read(now)`` is the last row with time <= now (all None before the
  first). Bad files fail at load with ``file:line``.
- ``NoBattery``: all None (the scheduler then runs at full speed).

``open_provider(spec)`` picks one through the ``PROVIDERS`` registry (which also writes the
CLI's help for ``--battery``). The clocks are in ``energy.clocks``, the per-step energy in
``energy.meter``.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Protocol

from mobiletune.errors import MobiletuneError
from mobiletune.runtime.energy.scheduler import Reading

SYSFS_ROOT = "/sys/class/power_supply"
TERMUX_COMMAND = ("termux-battery-status",)


class BatteryError(MobiletuneError):
    """A battery provider that cannot be opened or read, or a bad trace file."""


def _num(v, scale=1.0, positive=False, lo=-math.inf, hi=math.inf):
    """A finite float in [lo, hi] (from int, float or numeric str) times ``scale``, else None."""
    try:
        x = math.nan if v is None or isinstance(v, bool) else float(v)
    except (TypeError, ValueError):
        x = math.nan
    ok = math.isfinite(x) and lo <= x <= hi and not (positive and x <= 0)
    return x * scale if ok else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def find_battery(root=SYSFS_ROOT) -> Path | None:
    """The system battery's sysfs directory (one named like ``battery``/``BAT*`` first)."""
    try:
        dirs = sorted(Path(root).iterdir())
    except OSError:
        return None
    found = [d for d in dirs if _read(d / "type") == "Battery" and _read(d / "scope") != "Device"]
    found.sort(key=lambda d: not d.name.lower().startswith(("battery", "bat")))
    return found[0] if found else None


class SysfsBattery:
    def __init__(self, root=SYSFS_ROOT, path=None):
        self.path = Path(path) if path is not None else find_battery(root)
        if self.path is None:
            raise BatteryError(f"sysfs: no readable battery (type Battery) under {root}")
        self.root = self.path.parent

    def _plugged(self) -> bool | None:
        """Whether a charger supply (Mains/USB/Wireless/...) is online; None if none says."""
        try:
            others = [d for d in self.root.iterdir() if d != self.path]
        except OSError:
            return None
        seen = [_read(d / "online") == "1" for d in others
                if _read(d / "type") not in (None, "Battery") and _read(d / "online") in ("0", "1")]
        return any(seen) if seen else None

    def read(self, now: float | None = None) -> Reading:
        p = self.path
        status = (_read(p / "status") or "").lower()
        charging = {"charging": True, "full": True, "discharging": False}.get(status)
        if charging is None:
            charging = self._plugged()
        return Reading(time=time.time() if now is None else now,
                       level=_num(_read(p / "capacity"), lo=0, hi=100), charging=charging,
                       temperature_c=_num(_read(p / "temp"), 0.1, lo=-400, hi=1500),
                       current_a=_num(_read(p / "current_now"), 1e-6) or None,
                       voltage_v=_num(_read(p / "voltage_now"), 1e-6, positive=True),
                       source=f"sysfs:{p}")


def _run(cmd, timeout_s: float) -> str:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise BatteryError(f"termux: {cmd[0]} not found (pkg install termux-api, and install "
                           f"the Termux:API app)") from None
    except subprocess.TimeoutExpired:
        raise BatteryError(f"termux: {cmd[0]} gave no answer in {timeout_s:g}s (is the "
                           f"Termux:API app installed and allowed to run?)") from None
    if r.returncode != 0:
        raise BatteryError(f"termux: {cmd[0]} exited {r.returncode}: {r.stderr.strip()[:200]}")
    return r.stdout


class TermuxBattery:
    def __init__(self, command=TERMUX_COMMAND, timeout_s: float = 10.0, runner=None):
        self.command, self.timeout_s = tuple(command), timeout_s
        self.runner = runner or _run

    def read(self, now: float | None = None) -> Reading:
        out = self.runner(self.command, self.timeout_s)
        try:
            d = json.loads(out)
        except ValueError:
            raise BatteryError(f"termux: {self.command[0]} printed no JSON: {out[:200]!r}") from None
        if not isinstance(d, dict) or "error" in d:
            raise BatteryError(f"termux: {self.command[0]} answered {str(d)[:200]}")
        level = _num(d.get("percentage"), lo=0, hi=100)
        lv, sc = _num(d.get("level"), lo=0), _num(d.get("scale"), positive=True)
        if level is None and lv is not None and sc:
            level = _num(100.0 * lv / sc, lo=0, hi=100)
        plugged, status = str(d.get("plugged") or "").upper(), str(d.get("status") or "").upper()
        if plugged:
            charging = plugged != "UNPLUGGED"
        else:
            charging = {"CHARGING": True, "FULL": True, "DISCHARGING": False}.get(status)
        temp = _num(str(d.get("temperature")).replace(",", "."))  # "%.1f" in the phone's locale
        return Reading(time=time.time() if now is None else now, level=level, charging=charging,
                       temperature_c=None if temp is None or abs(temp + 0.1) < 1e-6 else temp,
                       current_a=_num(d.get("current"), 1e-6) or None,
                       voltage_v=_num(d.get("voltage"), 1e-3, positive=True), source="termux")


# trace column -> (Reading field, allowed range, or bool)
_TRACE_COLS = {"time": ("time", (-math.inf, math.inf)), "level": ("level", (0, 100)),
               "charging": ("charging", bool), "temperature": ("temperature_c", (-50, 150)),
               "temperature_c": ("temperature_c", (-50, 150)), "current_a": ("current_a", (-50, 50)),
               "voltage_v": ("voltage_v", (0, 100)), "screen_on": ("screen_on", bool),
               "idle": ("idle", bool)}
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _cell(v, kind, where: str):
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if kind is bool:
        got = v if isinstance(v, bool) else _BOOLS.get(str(v).strip().lower())
        if got is None:
            raise BatteryError(f"{where}={v!r} is not true/false/1/0/yes/no")
        return got
    x = _num(v, lo=kind[0], hi=kind[1])
    if x is None:
        raise BatteryError(f"{where}={v!r} is not a number in [{kind[0]:g}, {kind[1]:g}]")
    return x


def _trace_rows(path: Path):
    """(line number, {column: value}) for a CSV-with-header or a JSONL file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BatteryError(f"trace {path}: cannot read: {e}") from None
    body = [(i, s) for i, s in enumerate(lines, 1) if s.strip() and not s.lstrip().startswith("#")]
    if body and (path.suffix.lower() in (".jsonl", ".ndjson") or body[0][1].lstrip().startswith("{")):
        for i, s in body:
            try:
                r = json.loads(s)
            except ValueError as e:
                raise BatteryError(f"{path}:{i}: not JSON: {e}") from None
            if not isinstance(r, dict):
                raise BatteryError(f"{path}:{i}: expected a JSON object")
            yield i, r
        return
    header = [c.strip() for c in next(csv.reader([body[0][1]]))] if body else []
    for i, s in body[1:]:
        cells = next(csv.reader([s]))
        if len(cells) != len(header):
            raise BatteryError(f"{path}:{i}: {len(cells)} cells; the header has {len(header)}")
        yield i, dict(zip(header, cells))


class TraceBattery:
    def __init__(self, path):
        self.path = Path(path)
        self.times, self.readings = [], []
        for i, r in _trace_rows(self.path):
            w, vals = f"{self.path}:{i}", {}
            for col, v in r.items():
                if col not in _TRACE_COLS:
                    raise BatteryError(f"{w}: unknown column {col!r}; known: {list(_TRACE_COLS)}")
                field, kind = _TRACE_COLS[col]
                x = _cell(v, kind, f"{w}: {col}")
                if x is not None:
                    vals[field] = x
            t = vals.pop("time", None)
            if t is None or (self.times and t <= self.times[-1]):
                raise BatteryError(f"{w}: time {r.get('time')!r} missing or not after the "
                                   f"previous row's")
            self.times.append(t)
            self.readings.append(vals)
        if not self.times:
            raise BatteryError(f"trace {self.path}: no rows (want a header line, then "
                               f"time,level,charging,temperature rows; or JSONL objects)")

    @property
    def end_time(self) -> float:
        """The last row's time: its values stay in force after it."""
        return self.times[-1]

    def read(self, now: float) -> Reading:
        k = bisect.bisect_right(self.times, now) - 1
        return Reading(time=now, source=f"trace:{self.path}", **(self.readings[k] if k >= 0 else {}))


class NoBattery:
    def read(self, now: float | None = None) -> Reading:
        return Reading(time=time.time() if now is None else now, source="none")


class Provider(Protocol):
    """What the trainer reads the battery through: ``read(now)`` -> ``Reading`` (None for
    any value it cannot get). ``end_time`` (a trace's last row) is optional."""

    def read(self, now: float | None = None) -> Reading: ...


def _open_trace(arg: str, **_):
    if not arg:
        raise BatteryError("--battery trace:FILE needs a file")
    return TraceBattery(arg), f"trace {arg} (simulated clock)"


def _open_none(arg: str, **_):
    return NoBattery(), "none (no readings; training at full speed)"


def _open_sysfs(arg: str, sysfs_root=SYSFS_ROOT, **_):
    b = SysfsBattery(sysfs_root)
    return b, f"sysfs {b.path}"


def _open_termux(arg: str, termux_command=TERMUX_COMMAND, **_):
    if shutil.which(termux_command[0]) is None:
        raise BatteryError(f"termux: {termux_command[0]} not on PATH (pkg install termux-api)")
    b = TermuxBattery(termux_command)
    b.read(0.0)
    return b, f"termux ({' '.join(termux_command)})"


def _open_auto(arg: str, sysfs_root=SYSFS_ROOT, termux_command=TERMUX_COMMAND, **_):
    path = find_battery(sysfs_root)
    if path is not None:
        return SysfsBattery(path=path), f"sysfs {path} (auto)"
    if shutil.which(termux_command[0]) is not None:
        b = TermuxBattery(termux_command)
        try:
            b.read(0.0)
            return b, f"termux ({' '.join(termux_command)}) (auto)"
        except BatteryError as e:
            return NoBattery(), f"none (auto: no sysfs battery; {e})"
    return NoBattery(), (f"none (auto: no battery under {sysfs_root}, no {termux_command[0]} "
                         f"on PATH; training at full speed)")


# --battery value -> (how to open it, what it reads); ``trace`` takes ``trace:FILE``
PROVIDERS = {
    "auto": (_open_auto, "sysfs if a battery is found, else termux-battery-status, else none"),
    "sysfs": (_open_sysfs, "/sys/class/power_supply (Linux; Android often denies it to apps)"),
    "termux": (_open_termux, "termux-battery-status (Termux:API)"),
    "trace": (_open_trace, "trace:FILE replays a CSV/JSONL trace on a simulated clock"),
    "none": (_open_none, "no readings: train at full speed"),
}


def providers_help() -> str:
    return "; ".join(f"{k}{':FILE' if k == 'trace' else ''}: {d}" for k, (_, d) in PROVIDERS.items())


def open_provider(spec: str, sysfs_root=SYSFS_ROOT, termux_command=TERMUX_COMMAND):
    """``auto | sysfs | termux | trace:FILE | none`` -> (provider, what was picked)."""
    name, _, arg = (spec or "").strip().partition(":")
    if name not in PROVIDERS or (arg and name != "trace"):
        raise BatteryError(f"--battery {spec!r}: expected "
                           f"{', '.join(k + (':FILE' if k == 'trace' else '') for k in PROVIDERS)}")
    return PROVIDERS[name][0](arg, sysfs_root=sysfs_root, termux_command=termux_command)
