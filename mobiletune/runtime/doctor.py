"""``python -m mobiletune.runtime doctor [BUNDLE]``: can this device train that bundle?

Prints one ``name: value`` line per fact — architecture, cores, MemAvailable, the LiteRT
version, which battery source ``--battery auto`` picks and its reading, and, given a
bundle, the manifest and file check, free storage beside it, whether LiteRT created its
XNNPACK delegate, and one timed micro-step (the bundle's initial state, in memory only:
nothing on disk changes) with the measured peak RSS and the predicted seconds per
optimizer step. Each problem found is one ``problem: ...`` line; the exit status is 1 when
there is any, else 0.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError

MIN_PYTHON = (3, 10)


def mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _CaptureStderr:
    """Collect what native code writes to file descriptor 2 (LiteRT's INFO lines)."""

    def __enter__(self):
        sys.stderr.flush()
        self.f = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.f.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.f.seek(0)
        self.text = self.f.read().decode("utf-8", "replace")
        self.f.close()
        return False


def _state_bytes(m) -> int:
    return sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in m.state)


def check_bundle(bundle: Path, threads: int | None, facts: list, problems: list) -> None:
    from mobiletune.runtime.bundle import read_manifest, verify_files
    from mobiletune.runtime.metrics import peak_rss_mb
    from mobiletune.runtime.runner import open_bundle
    try:
        m = read_manifest(bundle)
        verify_files(bundle, m)
    except MobiletuneError as e:
        problems.append(f"bundle: {e}")
        return
    kind = "sharded" if m.sharded is not None else "monolithic"
    facts.append(("bundle", f"{bundle} ({kind}, schema {m.schema_version}, "
                            f"{m.model.get('family')}, variants {list(m.variants)}, "
                            f"effective batch {m.effective_batch} × {m.seq_len} tokens)"))
    free = shutil.disk_usage(bundle).free / 2**20
    need = 3 * _state_bytes(m) / 2**20 + 16   # two checkpoints + the final state, + logs
    facts.append(("storage free beside the bundle", f"{free:.0f} MB (checkpoints need about "
                                                    f"{need:.0f} MB)"))
    if free < need:
        problems.append(f"storage: {free:.0f} MB free under {bundle}, checkpoints need about "
                        f"{need:.0f} MB")
    k = min(m.variants)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, int(m.model["vocab_size"]), (k, m.seq_len), dtype=np.int32)
    batch = {"inputs": ids, "targets": np.roll(ids, -1, axis=1),
             "loss_mask": np.ones((k, m.seq_len), np.float32)}
    try:
        with _CaptureStderr() as cap:  # LiteRT says once per process when XNNPACK comes up
            runner = open_bundle(bundle, threads=threads, verify=False)
            runner.accumulate(batch)              # first call: arenas, weight packing
        t0 = time.perf_counter()
        runner.accumulate(batch)
        micro = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner.apply()
        apply_s = time.perf_counter() - t0
    except MobiletuneError as e:
        problems.append(f"bundle: {e}")
        return
    xnn = "XNNPACK delegate" in cap.text
    facts.append(("XNNPACK", "active (LiteRT created its XNNPACK delegate)" if xnn else
                  "not reported (LiteRT's built-in kernels; slower)"))
    if not xnn:
        problems.append("XNNPACK: LiteRT did not report its XNNPACK delegate; training runs "
                        "on the slower built-in kernels")
    per_step = micro * (m.effective_batch // k) + apply_s
    peak = peak_rss_mb()
    facts.append(("micro-step", f"{micro:.2f} s for {k} × {m.seq_len} tokens "
                                f"({k * m.seq_len / micro:.0f} tokens/s)"))
    facts.append(("predicted step", f"{per_step:.1f} s per optimizer step of "
                                    f"{m.effective_batch} × {m.seq_len} tokens"))
    facts.append(("predicted peak RSS", f"{peak:.0f} MB (measured over that micro-step)"))
    avail = mem_available_mb()
    if avail is not None and peak > avail:
        problems.append(f"memory: a step needs about {peak:.0f} MB, {avail:.0f} MB is available"
                        + ("" if m.sharded is not None else
                           "; a --sharded export of the recipe needs far less"))


def doctor(bundle=None, threads: int | None = None, battery: str = "auto",
           out=print) -> int:
    facts, problems = [], []
    facts.append(("architecture", f"{platform.machine()} ({platform.system()} "
                                  f"{platform.release()}, libc {' '.join(platform.libc_ver())})"))
    facts.append(("python", sys.version.split()[0]))
    if sys.version_info[:2] < MIN_PYTHON:
        problems.append(f"python: {sys.version.split()[0]}; mobiletune needs "
                        f"{'.'.join(map(str, MIN_PYTHON))}+")
    facts.append(("cores", str(cores())))
    avail = mem_available_mb()
    facts.append(("MemAvailable", "unknown (no /proc/meminfo)" if avail is None
                  else f"{avail:.0f} MB"))
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        facts.append(("LiteRT", f"ai-edge-litert {metadata.version('ai-edge-litert')}"))
    except ImportError as e:
        problems.append(f"LiteRT: ai_edge_litert does not import ({e}); pip install "
                        f"'mobiletune[runtime]'")
    from mobiletune.runtime.energy import battery as B
    from mobiletune.runtime.energy import scheduler as S
    try:
        provider, described = B.open_provider(battery)
        r = provider.read(0.0)
        d = S.decide(r, S.Thresholds(), (1,), None)
        facts.append(("battery", f"{described}: level {r.level}, charging {r.charging}, "
                                 f"temperature {r.temperature_c} C -> the scheduler would "
                                 f"{d.action} ({d.reason})"))
    except MobiletuneError as e:
        problems.append(f"battery: {e}")
    if bundle is not None:
        check_bundle(Path(bundle), threads, facts, problems)
    width = max(len(k) for k, _ in facts)
    for k, v in facts:
        out(f"{k + ':':<{width + 1}} {v}")
    for p in problems:
        out(f"problem: {p}")
    out(f"{len(problems)} problem(s)" if problems else "ok: no problems found")
    return 1 if problems else 0
