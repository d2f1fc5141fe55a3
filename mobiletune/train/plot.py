"""The loss curve of a run, from its metrics.jsonl, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(metrics: Path, png: Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(x) for x in Path(metrics).read_text(encoding="utf-8").splitlines() if x]
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=0.8, alpha=0.45)
        ema, smooth = tr[0][1], []
        for step, loss in tr:  # exponential moving average, for the trend
            ema = 0.9 * ema + 0.1 * loss
            smooth.append((step, ema))
        ax.plot(*zip(*smooth), label="train loss (EMA 0.9)", lw=1.5)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss", lw=1.5, ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = Path(png).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return Path(png)
