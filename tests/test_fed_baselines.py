"""The references on the same partition and token budget: local-only trains every client
alone (nothing exchanged) and centralized trains one phone on all clients' data for N·S
steps a round; both log the ServerApp's row format."""

import pytest

pytest.importorskip("tensorflow")

from mobiletune.fed.baselines import run_baseline  # noqa: E402
from tests.fed_helpers import log_rows, make_run  # noqa: E402


def test_local_only_and_centralized(tmp_path):
    for kind in ("local-only", "centralized"):
        run = make_run(tmp_path / kind, kind, clients=2, rounds=2)
        rows = run_baseline(run, kind, log=lambda m: None)
        assert rows == log_rows(run)
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert rows[-1]["val-loss"] < rows[0]["val-loss"]
        if kind == "local-only":
            assert rows[1]["accepted"] == 2 and rows[-1]["bytes-total"] == 0
            assert rows[1]["val-loss-best"] <= rows[1]["val-loss"] <= rows[1]["val-loss-worst"]
            steps = sorted(int(x["step"]) for x in _metrics(run, 0) if "loss" in x)
            assert steps == [1, 2, 3, 4]                     # R·S steps alone
        else:
            data = sum((run / "partition" / f"client-{i:03d}" / "train.txt").stat().st_size for i in (0, 1))
            assert rows[1]["bytes-up"] == data and rows[2]["bytes-up"] == 0
            assert len([x for x in _metrics(run, 0) if "loss" in x]) == 2 * 2 * 2   # N·S per round


def _metrics(run, i):
    import json
    p = run / "clients" / f"client-{i:03d}" / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()]
