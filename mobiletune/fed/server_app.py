"""The Flower ServerApp: runs the strategy round by round, evaluates the global adapter on
the global held-out set (perplexity, and multiple-choice accuracy when the run has items),
checkpoints it atomically after every round, resumes from the last completed round, and
writes one metrics log for the run (``RUN/metrics.jsonl``).

The loop is ``Strategy.start``'s (configure_train → send_and_receive → aggregate_train →
configure/aggregate_evaluate) with the true round number and a checkpoint between rounds,
so a killed server resumes at round k+1 with the global adapter and the strategy's own
state (FedAdam's moments, FlexLoRA's SVD) of round k: the same run as an uninterrupted one.
Server-side evaluation runs the bundle through the phone's runtime (LiteRT), as a phone
would score it.

Round row: ``round``, ``method``, ``clients`` (each client's metrics), ``rejected`` /
``failed`` (with reasons), ``bytes-down`` / ``bytes-up`` and their running totals,
``aggregation-s``, ``round-s`` (simulated synchronous round: the slowest client's
download + compute + upload, plus aggregation; SplitLoRA, whose clients train one after
another: their sum), ``cut-bytes-up`` / ``cut-bytes-down`` (SplitLoRA: the activations and
gradients at the cut, also in ``bytes-*``), ``wall-s`` (cumulative), ``energy-j``
(sum over clients) and its running total, ``peak-rss-mb`` (max over clients), ``val-loss``,
``val-ppl``, ``mc-acc``, and ``host-s`` (this machine's time for the round).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from mobiletune.fed import adapter as W
from mobiletune.fed import spec as S
from mobiletune.fed import strategies as T
from mobiletune.fed.records import from_record, to_record
from mobiletune.io import atomic
from mobiletune.runtime.state_checkpoints import Checkpoints

LOG = "metrics.jsonl"


def info(msg: str) -> None:
    import sys
    print(msg, file=sys.stderr, flush=True)


class Evaluator:
    """The global adapter scored with the default bundle (runtime only)."""

    def __init__(self, run: Path, spec: S.RunSpec):
        from mobiletune.fed.local import LocalClient, eval_dataset
        self.client = LocalClient(spec.bundle(), [S.global_val(run, spec.data_kind)],
                                  run / "server" / "evaluator", log=lambda m: None)
        self.init = self.client.initial_adapter()
        data = eval_dataset(spec.bundle(), [S.global_val(run, spec.data_kind)])
        self.data = data.take(np.arange(min(len(data), spec.eval_max_examples)))
        self.mc = None
        mc_file = run / "partition" / "mc.jsonl"
        if spec.mc_items and mc_file.exists():
            from mobiletune.fed.tasks import MultipleChoice
            self.mc = MultipleChoice.read(mc_file, spec.mc_items)

    def __call__(self, wire: dict) -> dict:
        full = {**self.init, **wire}
        nll, count = self.client.evaluate(full, self.data)
        loss = nll / max(count, 1.0)
        out = {"val-loss": loss, "val-ppl": math.exp(min(loss, 50.0)), "val-tokens": count}
        if self.mc is not None:
            out["mc-acc"] = self.mc.accuracy(self.client, full)
        return out


def read_log(path: Path, upto: int) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                break
            if r["round"] <= upto:
                rows.append(r)
    return rows


def serve(grid: Grid, run, log=info) -> list[dict]:
    """Run (or resume) the federated run in ``run``; returns the metrics rows."""
    run = Path(run)
    spec = S.read(run)
    ev = Evaluator(run, spec)
    lora = ev.client.m.lora
    strategy = T.make(spec.method, W.shapes(ev.init), lora, mu=spec.mu,
                      fraction_train=spec.fraction_train, fraction_evaluate=spec.fraction_evaluate,
                      min_nodes=1, eta=spec.eta, bundle=spec.bundle(), cut=spec.cut,
                      split_host=spec.split_host, split_port=spec.split_port,
                      split_tls=(spec.split_tls_cert, spec.split_tls_key))
    try:
        return _rounds(grid, run, spec, ev, strategy, log)
    finally:
        if hasattr(strategy, "close"):
            strategy.close()


def _rounds(grid: Grid, run: Path, spec: S.RunSpec, ev: Evaluator, strategy, log) -> list[dict]:
    lora = ev.client.m.lora
    # the whole model's adapter from the global arrays (SplitLoRA: + the server's layers)
    whole = getattr(strategy, "complete", lambda w: w)
    ckpts = Checkpoints(run / "server" / "checkpoints", keep=2, log=log)
    got = ckpts.latest()
    if got is not None:
        done, saved, meta = got
        glob = {k[len("global/"):]: v for k, v in saved.items() if k.startswith("global/")}
        if hasattr(strategy, "load_state"):
            strategy.load_state({k[len("strategy/"):]: v for k, v in saved.items()
                                 if k.startswith("strategy/")})
        log(f"server: resumed after round {done}")
    else:
        done = 0
        glob = dict(ev.init)
        if spec.method == "ffa":
            glob = {k: v for k, v in glob.items() if k.endswith(W.B_SUFFIX)}
        if spec.method == "splitlora":
            glob = strategy.client_part(glob)
    rows = read_log(run / LOG, done)
    atomic.write_text(run / LOG, "".join(json.dumps(r) + "\n" for r in rows))
    if done == 0:
        row = {"round": 0, "method": spec.method, **ev(whole(glob)), "bytes-down": 0, "bytes-up": 0,
               "bytes-total": 0, "wall-s": 0.0, "energy-j-total": 0.0}
        _append(run, rows, row, log)
    arrays = to_record(glob)
    if spec.method == "flexlora" and done == 0:
        arrays = to_record({})          # round 1: every phone starts from its own init
    for rnd in range(done + 1, spec.rounds + 1):
        t0 = time.perf_counter()
        msgs = strategy.configure_train(rnd, arrays, ConfigRecord({}), grid)
        replies = strategy.send(grid, msgs, spec.round_timeout_s)
        new, _ = strategy.aggregate_train(rnd, replies)
        if new is not None:
            arrays, glob = new, from_record(new)
        rl = strategy.round_log
        ev_replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(rnd, arrays, ConfigRecord({}), grid),
            timeout=spec.round_timeout_s)
        client_eval = strategy.aggregate_evaluate(rnd, ev_replies)
        clients = rl.get("clients", [])
        prev = rows[-1]
        row = {"round": rnd, "method": spec.method, "clients": clients,
               "accepted": len(clients), "rejected": rl.get("rejected", []),
               "failed": rl.get("failed", []), "bytes-down": strategy.bytes_down,
               "bytes-up": rl.get("bytes-up", 0), "aggregation-s": rl.get("aggregation-s", 0.0),
               # synchronous round: the slowest client; SplitLoRA's clients go one by one
               "round-s": (sum if getattr(strategy, "sequential", False) else max)(
                   [c.get("round-s", 0.0) for c in clients] or [0.0]) + rl.get("aggregation-s", 0.0),
               "energy-j": sum(c.get("energy-j", 0.0) for c in clients),
               "peak-rss-mb": max([c.get("rss-peak-mb", 0.0) for c in clients] or [0.0]),
               "train-loss": (sum(c["train-loss"] * c["num-examples"] for c in clients)
                              / sum(c["num-examples"] for c in clients)) if clients else None,
               **ev(whole(glob))}
        for k in ("cut-bytes-up", "cut-bytes-down"):
            if k in rl:
                row[k] = rl[k]
        if client_eval is not None:
            row["client-val-loss"] = float(client_eval.get("val-loss", math.nan))
        row["bytes-total"] = prev["bytes-total"] + row["bytes-down"] + row["bytes-up"]
        row["wall-s"] = prev["wall-s"] + row["round-s"]
        row["energy-j-total"] = prev["energy-j-total"] + row["energy-j"]
        row["host-s"] = time.perf_counter() - t0
        state = {f"global/{k}": v for k, v in glob.items()}
        if hasattr(strategy, "state"):
            state.update({f"strategy/{k}": np.asarray(v) for k, v in strategy.state().items()})
        ckpts.save(rnd, state, {"method": spec.method})
        _append(run, rows, row, log)
    from mobiletune.runtime import peft_io
    full = {**ev.init, **glob} if spec.method == "ffa" else whole(glob)
    if spec.method == "flexlora":
        full = strategy.global_adapter(int(lora["r"])) if strategy.svds else ev.init
    peft_io.write_adapter(run / "adapter", {k[len(W.PREFIX):]: v for k, v in full.items()},
                          lora, ev.client.m.model["family"], base_model=ev.client.m.base_model)
    return rows


def _append(run: Path, rows: list, row: dict, log) -> None:
    rows.append(row)
    with open(run / LOG, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    log(f"round {row['round']}: val ppl {row['val-ppl']:.3f}"
        + (f", mc acc {row['mc-acc']:.3f}" if "mc-acc" in row else "")
        + f", {row['bytes-total'] / 1e6:.3f} MB so far, {len(row.get('rejected', []))} rejected, "
          f"{len(row.get('failed', []))} failed")


def make_app(run_dir=None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, run_dir or str(context.run_config["run-dir"]))

    return app


app = make_app()
