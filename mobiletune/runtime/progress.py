"""A progress bar with throughput and ETA on stderr (tqdm when installed, else a plain
line every few seconds), so long work shows tokens/s and time left."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, unit: str = "tok", desc: str = ""):
        self.total, self.unit, self.desc = total, unit, desc
        self.n, self.t0, self.last = 0, time.perf_counter(), 0.0
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.1)
        except ImportError:
            self.bar = None

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last > 5 or self.n >= self.total:
            self.last = now
            rate = self.n / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            print(f"{self.desc} {self.n}/{self.total} {self.unit} {rate:.1f} {self.unit}/s "
                  f"eta {eta:.0f}s {extra}", file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
