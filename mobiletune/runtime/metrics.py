"""``metrics.jsonl``: one JSON object per optimizer step (and per scheduler event), shared by
the desktop and the device trainer. On resume from step N, rows of later steps — and
events at N or later — are dropped: those steps are taken again."""

from __future__ import annotations

import json
import resource
from pathlib import Path

from mobiletune.io.atomic import write_text as write_text_atomic


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now (MB; Linux /proc, else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (resource.getpagesize() / 2**20)
    except OSError:
        return peak_rss_mb()


class MetricsLog:
    def __init__(self, path: Path, upto: int):
        self.path = Path(path)
        keep = [r for r in self.rows()
                if r.get("step", 0) <= upto and not (r.get("event") and r["step"] >= upto)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep) if upto else "")

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                break
        return out

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
