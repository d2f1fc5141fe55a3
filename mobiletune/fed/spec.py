"""A federated run directory, the one place both sides read their settings from
(standard library only; the phone reads it)::

    RUN/fed.json            ``RunSpec``: method, rounds, local steps, bundles, ...
    RUN/profiles.json       device profiles (``mobiletune.fed.profiles``)
    RUN/partition/          partition.json, client-NNN/{train,val}.<txt|jsonl>, global_val.*
    RUN/clients/client-NNN/ each phone's state (checkpoints, metrics.jsonl, fed.json)
    RUN/server/             per-round checkpoints of the global adapter (+ strategy state)
    RUN/metrics.jsonl       one row per round (and round 0: the starting adapter)

In a deployment each SuperNode gets ``--node-config "partition-id=I run-dir='RUN'"``
(a copy of RUN's fed.json, profiles.json, its own partition and its bundle on the phone).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from mobiletune.errors import MobiletuneError

FILE = "fed.json"


@dataclass(frozen=True)
class RunSpec:
    method: str = "fedavg"              # fedavg | fedprox | fedadam | flexlora | ffa | splitlora
    rounds: int = 3
    local_steps: int = 4
    clients: int = 2
    mu: float = 0.0                     # FedProx
    optimizer_state: str = "carry"      # carry | reset (phone's optimizer across rounds)
    seed: int = 0
    deadline_s: float | None = None     # phone seconds per round (stragglers stop there)
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0      # client-side evaluation of the global adapter
    round_timeout_s: float = 900.0
    eta: float = 1e-2                   # FedAdam's server learning rate
    eval_max_examples: int = 64         # global held-out examples the server evaluates
    mc_items: int = 0                   # WordNet multiple-choice items (0: none)
    bundles: dict = field(default_factory=dict)   # name -> bundle directory
    default_bundle: str = ""
    data_kind: str = "txt"              # txt | jsonl (the partition files' extension)
    cut: int | None = None              # SplitLoRA: the phone runs layers < cut (None: half)
    split_host: str = "127.0.0.1"       # SplitLoRA: the server's cut endpoint (host, port)
    split_port: int = 0
    split_tls_cert: str | None = None   # SplitLoRA: the endpoint's TLS certificate + key (the
    split_tls_key: str | None = None    # phones trust this certificate); None: plain HTTP

    def __post_init__(self):
        if self.default_bundle not in self.bundles:
            raise MobiletuneError(f"fed.json: default_bundle {self.default_bundle!r} is not one "
                                  f"of bundles {sorted(self.bundles)}")
        for name in ("rounds", "local_steps", "clients"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise MobiletuneError(f"fed.json: {name}={v!r}: must be a positive integer")

    def bundle(self, name: str | None = None) -> Path:
        return Path(self.bundles[name or self.default_bundle])

    def to_dict(self) -> dict:
        return asdict(self)


def read(run) -> RunSpec:
    p = Path(run) / FILE
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MobiletuneError(f"{p}: cannot read the run's settings ({e})") from None
    unknown = sorted(set(d) - {f.name for f in fields(RunSpec)})
    if unknown:
        raise MobiletuneError(f"{p}: unknown key {unknown[0]!r}")
    return RunSpec(**d)


def write(run, spec: RunSpec) -> Path:
    from mobiletune.io import atomic
    p = Path(run) / FILE
    atomic.write_text(p, json.dumps(spec.to_dict(), indent=1) + "\n")
    return p


def client_dir(run, pid: int) -> Path:
    return Path(run) / "clients" / f"client-{pid:03d}"


def partition_files(run, pid: int, kind: str) -> tuple[Path, Path]:
    d = Path(run) / "partition" / f"client-{pid:03d}"
    return d / f"train.{kind}", d / f"val.{kind}"


def global_val(run, kind: str) -> Path:
    return Path(run) / "partition" / f"global_val.{kind}"
