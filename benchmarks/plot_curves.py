"""Loss against wall-clock for several runs on one figure (EMA 0.9 of the per-step loss).

    python benchmarks/plot_curves.py OUT.png METRICS.jsonl=LABEL ... [--title T]

A run's clock: the cumulative ``seconds`` of its rows (the phone trainer's compute time),
or, for a side-tuning server's metrics, ``unix_time`` since ``--start`` (default: the
first row's time minus its ``seconds``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(path: Path):
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("loss") is not None]
    if rows and "unix_time" in rows[0]:
        t0 = rows[0]["unix_time"] - rows[0]["seconds"]
        xs = [r["unix_time"] - t0 for r in rows]
    else:
        xs, t = [], 0.0
        for r in rows:
            t += r["seconds"]
            xs.append(t)
    ema, ys = rows[0]["loss"], []
    for r in rows:
        ema = 0.9 * ema + 0.1 * r["loss"]
        ys.append(ema)
    return xs, ys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+", metavar="METRICS=LABEL")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for spec in args.runs:
        path, _, label = spec.partition("=")
        ax.plot(*curve(Path(path)), label=label or path, lw=1.5)
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("training loss, EMA 0.9 (nats/token)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)


if __name__ == "__main__":
    main()
