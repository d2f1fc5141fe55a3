"""A federated run on Flower's simulation engine: N virtual SuperNodes (Ray actors) run the
phone's ClientApp on this machine; the ServerApp runs in this process."""

from __future__ import annotations

import os
from pathlib import Path

QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}


def simulate(run, clients: int, cpus: int | None = None) -> None:
    for k, v in QUIET.items():
        os.environ.setdefault(k, v)
    from flwr.simulation import run_simulation

    from mobiletune.fed.client_app import make_app as client_app
    from mobiletune.fed.server_app import make_app as server_app
    run = str(Path(run).resolve())
    os.environ["MOBILETUNE_FED_RUN"] = run
    cpus = cpus or min(2, os.cpu_count() or 1)
    run_simulation(server_app=server_app(run), client_app=client_app(run), num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "log_to_driver": True}})
