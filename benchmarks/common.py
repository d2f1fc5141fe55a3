"""What the benchmark scripts share: run one measured child process, and its environment.

Each system runs in its own fresh interpreter so that no two share caches, threads or
memory; the parent only orchestrates. A child's peak RSS comes from ``os.wait4`` on that
child alone (Linux reports the largest of it and its reaped descendants), not from the
parent's cumulative ``RUSAGE_CHILDREN``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHILD = HERE / "child.py"
if str(ROOT) not in sys.path:  # the scripts run as files, from any directory
    sys.path.insert(0, str(ROOT))


@dataclass
class Child:
    rc: int
    stdout: str
    stderr: str
    peak_rss_mb: float
    wall_s: float

    def last_json(self) -> dict:
        """The last stdout line, a JSON object (how every child reports)."""
        return json.loads(self.stdout.strip().splitlines()[-1])

    def error(self) -> str:
        """The last non-empty line of stderr (or stdout): the child's own error message."""
        lines = [x for x in (self.stderr or self.stdout).strip().splitlines() if x.strip()]
        return lines[-1].removeprefix("mobiletune: error: ") if lines else f"exit status {self.rc}"


def child_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu",
                TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(
                    [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def run(cmd: list, threads: int = 2) -> Child:
    """Run ``cmd`` to completion; stdout/stderr go through temp files (no pipe deadlock)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, cwd=ROOT,
                             env=child_env(threads))
        _, status, ru = os.wait4(p.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Child(p.returncode, out.read(), err.read(), ru.ru_maxrss / 1024, wall)


def time_steps(spec: dict, threads: int = 2) -> Child:
    """Time a desktop system's train step (``child.py``; spec: see its docstring)."""
    return run([sys.executable, CHILD, json.dumps(spec)], threads)


def median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
