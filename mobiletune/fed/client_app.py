"""The phone's Flower ClientApp: runtime + flwr only (no JAX, no TensorFlow; a test
imports this module with those blocked).

``make_app(run_dir)`` builds it for the simulation engine; ``app`` (``mobiletune.fed.
client_app:app``) is the deployment one: the SuperNode's ``--node-config`` names
``partition-id`` and ``run-dir``. Messages:

* TRAIN: config ``server-round`` (+ ``proximal-mu`` from FedProx), arrays the global adapter
  (empty: keep the local one). The phone trains ``local_steps`` with ``LocalClient`` and
  replies with its adapter and metrics (``num-examples``, ``partition-id``, step time,
  upload/download time from the profile's link, RSS average and peak, bytes each way,
  energy, paused/stopped). Offline this round (the profile's availability) or dropping out
  mid-round (its dropout rate): an error reply, as a real phone that vanished.
* EVALUATE: NLL of the client's held-out split under the global adapter.
* QUERY: the LoRA rank this device trains (FlexLoRA) and its partition id (the order
  SplitLoRA's clients train in).

SplitLoRA: the TRAIN config also names the server's cut endpoint (``split-url``,
``split-token``, ``split-cut``); the phone trains layers < cut and exchanges activations
and gradients with the server over HTTP (``mobiletune.runtime.split``) every micro-batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mobiletune.fed import profiles as P
from mobiletune.fed import spec as S
from mobiletune.fed.local import LocalClient, RoundConfig, eval_dataset
from mobiletune.fed.records import from_record, to_record

_CLIENTS: dict = {}           # (run dir, partition) -> LocalClient, for this process


class ClientUnavailable(RuntimeError):
    """This device is offline this round or dropped out mid-round (profile draw)."""


def locate(context: Context, run_dir) -> tuple[Path, int]:
    nc = context.node_config
    run = run_dir or nc.get("run-dir") or os.environ.get("MOBILETUNE_FED_RUN")
    if not run:
        raise RuntimeError("no run directory: --node-config \"run-dir='RUN' partition-id=I\"")
    return Path(str(run)), int(nc.get("partition-id", 0))


def bundle_name(spec: S.RunSpec, prof: P.DeviceProfile) -> str:
    """FlexLoRA: the bundle of the profile's rank (``r<rank>``); else the memory budget's."""
    if prof.lora_rank is not None and f"r{prof.lora_rank}" in spec.bundles:
        return f"r{prof.lora_rank}"
    return prof.bundle_for(spec.default_bundle)


def client(run: Path, pid: int) -> tuple[LocalClient, S.RunSpec, P.Profiles]:
    spec, profs = S.read(run), P.read(run / P.FILE)
    key = (str(run), pid)
    if key not in _CLIENTS:
        if len(_CLIENTS) >= 2:          # at most two phones' bundles open per process
            _CLIENTS.pop(next(iter(_CLIENTS)))
        prof = profs.of(pid)
        train, _ = S.partition_files(run, pid, spec.data_kind)
        _CLIENTS[key] = LocalClient(spec.bundle(bundle_name(spec, prof)), [train],
                                    S.client_dir(run, pid), battery=profs.battery_spec(pid),
                                    speed=prof.speed, memory_budget_mb=prof.memory_budget_mb,
                                    power_w=prof.power_w, threads=1)
    return _CLIENTS[key], spec, profs


def train(msg: Message, run: Path, pid: int) -> Message:
    c, spec, profs = client(run, pid)
    conf = msg.content["config"] if "config" in msg.content.config_records else ConfigRecord()
    rnd = int(conf.get("server-round", 0))
    if not profs.available(rnd, pid):
        raise ClientUnavailable(f"partition {pid} is offline in round {rnd} (profile)")
    prof = profs.of(pid)
    wire = from_record(msg.content.array_records.get("arrays"))
    drops = profs.drops_out(rnd, pid)
    cfg = RoundConfig(steps=max(1, spec.local_steps // 2) if drops else spec.local_steps,
                      mu=float(conf.get("proximal-mu", 0.0)),
                      optimizer_state=spec.optimizer_state, frozen_a=spec.method == "ffa",
                      deadline_s=spec.deadline_s)
    down = sum(v.nbytes for v in wire.values())
    split = None
    if spec.method == "splitlora":
        split = (int(conf["split-cut"]), split_link(conf, pid, c.log, spec.split_tls_cert))
    try:
        res = c.train_round(wire or None, cfg, rnd, bytes_down=down, transfer=prof.transfer_s,
                            split=split)
    finally:
        if split is not None:
            split[1].close()
    if drops:
        raise ClientUnavailable(f"partition {pid} dropped out of round {rnd} after "
                                f"{res.metrics['steps']} steps (profile)")
    if res.num_examples == 0:
        raise ClientUnavailable(f"partition {pid}: no step done before the deadline")
    metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))
               and math.isfinite(v)}
    metrics.update({"num-examples": res.num_examples, "partition-id": pid})
    return Message(RecordDict({"arrays": to_record(res.adapter), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


def split_link(conf: ConfigRecord, pid: int, log, cafile=None):
    """SplitLoRA: the phone's HTTP link to the server's cut endpoint named in the round's
    config (its URL and this device's bearer token); ``cafile``: the endpoint's certificate."""
    from mobiletune.runtime.split.protocol import device_name
    from mobiletune.runtime.split.runner import SplitClient
    for k in ("split-url", "split-token", "split-cut"):
        if k not in conf:
            raise RuntimeError(f"a SplitLoRA round's config lacks {k!r}")
    return SplitClient(str(conf["split-url"]), str(conf["split-token"]), device_name(pid),
                       cafile=cafile, log=log)


def evaluate(msg: Message, run: Path, pid: int) -> Message:
    c, spec, _ = client(run, pid)
    _, val = S.partition_files(run, pid, spec.data_kind)
    wire = from_record(msg.content.array_records.get("arrays"))
    if spec.method == "ffa":
        wire = {**c.initial_adapter(), **wire}
    nll, count = c.evaluate(wire or None, eval_dataset(c.bundle, [val]))
    return Message(RecordDict({"metrics": MetricRecord({
        "val-loss": nll / max(count, 1.0), "num-examples": int(count), "partition-id": pid})}),
        reply_to=msg)


def query(msg: Message, run: Path, pid: int) -> Message:
    c, _, _ = client(run, pid)
    return Message(RecordDict({"props": MetricRecord({"lora-rank": c.rank, "partition-id": pid})}),
                   reply_to=msg)


def make_app(run_dir=None) -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, *locate(context, run_dir))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, *locate(context, run_dir))

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query(msg, *locate(context, run_dir))

    return app


app = make_app()
