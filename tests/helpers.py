"""What several test files share: recipe files, a run's losses, a phone's clock and a
draining battery, killing a run with SIGKILL after some steps, and the check that the
phone side imports no desktop framework."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mobiletune.errors import MobiletuneError
from mobiletune.runtime.energy.clocks import SimClock

DESKTOP_FRAMEWORKS = ("jax", "jaxlib", "flax", "optax", "tensorflow", "torch", "transformers")

# time s, level %, charging, temperature C: full -> draining -> low -> charging
DRAINING_TRACE = ("time,level,charging,temperature\n0,90,false,30\n120,60,false,33\n"
                  "240,35,false,36\n350,15,false,36\n3600,30,true,34\n")


def write_recipe(path: Path, recipe) -> Path:
    """A recipe file that builds ``recipe`` (a ``Recipe``; its repr is Python)."""
    path.write_text("from mobiletune.runtime.energy.scheduler import Thresholds\n"
                    "from mobiletune.runtime.side.config import SideConfig\n"
                    "from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe\n"
                    f"recipe = {recipe!r}\n")
    return path


def losses(run: Path) -> list[float]:
    """The per-step losses of a run directory (or of its metrics.jsonl)."""
    p = run / "metrics.jsonl" if run.is_dir() else run
    return [json.loads(x)["loss"] for x in p.read_text().splitlines() if '"loss"' in x]


class PhoneClock(SimClock):
    """As if every optimizer step took a phone 60 s (throttle sleeps come on top)."""

    def advance(self, s):
        self.t += 60.0


def draining_trace(path: Path) -> Path:
    path.write_text(DRAINING_TRACE)
    return path


def kill_after_steps(start, run: Path, steps_done, timeout_s: float = 300) -> None:
    """``start(resume: bool) -> Popen`` a training run writing ``run/metrics.jsonl``;
    SIGKILL it once it has logged each of ``steps_done`` steps, resuming in between."""
    for i, at in enumerate(steps_done):
        p = start(i > 0)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and p.poll() is None:
                m = run / "metrics.jsonl"
                if m.exists() and len(losses(m)) >= at:
                    break
                time.sleep(0.002)
            assert p.poll() is None, f"the run ended (or hung) before step {at}"
            os.kill(p.pid, signal.SIGKILL)
        finally:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=60)


def imported(code: str, tops=DESKTOP_FRAMEWORKS, python: str = sys.executable) -> list[str]:
    """Run ``code`` in a fresh interpreter; the modules under ``tops`` (top-level package
    names; the desktop frameworks by default) it ended up importing."""
    probe = (f"{code}\nimport sys\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {tuple(tops)!r}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1].replace("'", '"'))


def require_asset(find, *args):
    """``find(*args)``: the path of a real asset; skip when it is not installed, except
    under CI (CI=true), where the test command installs assets first and a miss fails."""
    try:
        return find(*args)
    except MobiletuneError as e:
        if os.environ.get("CI"):
            pytest.fail(f"asset {args} missing under CI: {e}")
        pytest.skip(f"asset not installed: {e}")


def self_signed_cert(d: Path) -> Path:
    """``d/cert.pem`` + ``d/key.pem``: a one-day self-signed certificate for 127.0.0.1."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d
