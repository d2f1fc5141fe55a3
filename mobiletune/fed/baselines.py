"""The two references a federated run is read against, on the same partition, bundle and
token budget, written as the same ``RUN/metrics.jsonl`` rows as the ServerApp's:

* ``local-only``: every client trains alone for the run's R·S steps on its own partition
  (nothing is exchanged); each round's row scores every client's adapter on the global
  held-out set and reports their mean (``val-loss``), best and worst.
* ``centralized``: one trainer on all clients' training data, N·S steps per round (the
  tokens the N clients of a round train on); its first row charges the upload of the raw
  data (what federating avoids).

Both run the phone trainer (``LocalClient``) on the bundle, so costs are measured the way
the clients' are. No Flower.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from mobiletune.fed import profiles as P
from mobiletune.fed import spec as S
from mobiletune.fed.local import LocalClient, RoundConfig
from mobiletune.fed.server_app import LOG, Evaluator
from mobiletune.io import atomic

KINDS = ("local-only", "centralized")


def _row(rnd, kind, evals: list[dict], costs: list[dict], prev: dict | None, up: int = 0) -> dict:
    loss = sum(e["val-loss"] for e in evals) / len(evals)
    row = {"round": rnd, "method": kind, "val-loss": loss, "val-ppl": math.exp(min(loss, 50.0)),
           "val-loss-best": min(e["val-loss"] for e in evals),
           "val-loss-worst": max(e["val-loss"] for e in evals),
           "bytes-down": 0, "bytes-up": up, "accepted": len(costs),
           "round-s": max([c.get("round-s", 0.0) for c in costs] or [0.0]),
           "energy-j": sum(c.get("energy-j", 0.0) for c in costs),
           "peak-rss-mb": max([c.get("rss-peak-mb", 0.0) for c in costs] or [0.0])}
    if "mc-acc" in evals[0]:
        row["mc-acc"] = sum(e["mc-acc"] for e in evals) / len(evals)
    p = prev or {"bytes-total": 0, "wall-s": 0.0, "energy-j-total": 0.0}
    row["bytes-total"] = p["bytes-total"] + up
    row["wall-s"] = p["wall-s"] + row["round-s"]
    row["energy-j-total"] = p["energy-j-total"] + row["energy-j"]
    return row


def run_baseline(run, kind: str, log=print) -> list[dict]:
    run = Path(run)
    spec, profs = S.read(run), P.read(run / P.FILE)
    ev = Evaluator(run, spec)
    rows: list[dict] = []
    atomic.write_text(run / LOG, "")
    quiet = lambda m: None  # noqa: E731
    if kind == "local-only":
        clients = [LocalClient(spec.bundle(), [S.partition_files(run, i, spec.data_kind)[0]],
                               S.client_dir(run, i), speed=profs.of(i).speed, log=quiet)
                   for i in range(spec.clients)]
        steps = spec.local_steps
    elif kind == "centralized":
        files = [S.partition_files(run, i, spec.data_kind)[0] for i in range(spec.clients)]
        clients = [LocalClient(spec.bundle(), files, S.client_dir(run, 0), log=quiet)]
        steps = spec.local_steps * spec.clients
    else:
        raise ValueError(f"baseline {kind!r}: expected one of {KINDS}")
    init = ev(clients[0].initial_adapter())
    _emit(run, rows, _row(0, kind, [init], [], None), log)
    up = sum(f.stat().st_size for f in files) if kind == "centralized" else 0
    for rnd in range(1, spec.rounds + 1):
        t0 = time.perf_counter()
        costs, evals = [], []
        for c in clients:
            res = c.train_round(None, RoundConfig(steps=steps, optimizer_state=spec.optimizer_state), rnd)
            costs.append(res.metrics)
            evals.append(ev(res.adapter))
        row = _row(rnd, kind, evals, costs, rows[-1], up if rnd == 1 else 0)
        row["host-s"] = time.perf_counter() - t0
        _emit(run, rows, row, log)
    return rows


def _emit(run: Path, rows: list, row: dict, log) -> None:
    rows.append(row)
    with open(run / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    log(f"{row['method']} round {row['round']}: val ppl {row['val-ppl']:.3f}")
