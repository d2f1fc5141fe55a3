"""Federated runs on Flower's simulation engine (Ray actors running the phone's ClientApp on
tiny LiteRT bundles): FedProx with μ = 0 is FedAvg (2 rounds, 2 clients); a server killed with SIGKILL after a
round resumes from its checkpoint and ends with the same adapter as an uninterrupted run;
FlexLoRA with heterogeneous ranks and dropouts completes its rounds with failures logged;
FFA-LoRA moves only B (half the bytes) and leaves A at the shared init."""


import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("tensorflow")

from mobiletune.fed.sim import simulate  # noqa: E402
from tests.fed_helpers import fed_bundle, final_adapter, kill_server_after_round, log_rows, make_run  # noqa: E402


@pytest.fixture(scope="module")
def fedavg3(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("fedavg") / "run", "fedavg", rounds=2)
    simulate(run, 2)
    return run


def test_fedprox_mu0_equals_fedavg(fedavg3, tmp_path):
    run = make_run(tmp_path / "prox", "fedprox", rounds=2, mu=0.0)
    simulate(run, 2)
    a, b = final_adapter(fedavg3), final_adapter(run)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k])
    rows = log_rows(fedavg3)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["val-loss"] < rows[0]["val-loss"]          # it learns
    c = rows[1]["clients"]
    assert len(c) == 2 and all(x["steps"] == 2 and x["bytes-up"] > 0 and x["rss-peak-mb"] > 0
                               and x["energy-j"] > 0 for x in c)
    # the server counts Flower's ArrayRecord bytes (arrays + names), the phones the arrays
    assert sum(x["bytes-up"] for x in c) < rows[1]["bytes-up"] < 1.5 * sum(x["bytes-up"] for x in c)
    assert rows[1]["aggregation-s"] >= 0


def test_killed_server_resumes_with_the_same_final_adapter(fedavg3, tmp_path):
    run = make_run(tmp_path / "killed", "fedavg", rounds=2)
    kill_server_after_round(run, 2)
    simulate(run, 2)
    rows = log_rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    a, b = final_adapter(fedavg3), final_adapter(run)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)


def test_flexlora_heterogeneous_ranks_with_dropouts(tmp_path):
    run = make_run(tmp_path / "flex", "flexlora", clients=3, rounds=2, ranks=(2, 4), dropout=0.3)
    simulate(run, 3)     # profile seed 1: partition 0 drops out of round 1
    rows = log_rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    failed = sum(len(r["failed"]) for r in rows[1:])
    accepted = sum(r["accepted"] for r in rows[1:])
    assert failed >= 1 and accepted >= 3 and all(r["accepted"] + len(r["failed"]) == 3 for r in rows[1:])
    ranks = {int(c["lora-rank"]) for r in rows[1:] for c in r["clients"]}
    assert ranks == {2, 4}
    # a rank-2 client's upload is half a rank-4 client's
    by_rank = {int(c["lora-rank"]): c["bytes-up"] for r in rows[1:] for c in r["clients"]}
    assert by_rank[2] * 2 == by_rank[4]


def test_ffa_moves_only_b_and_keeps_the_shared_a(tmp_path):
    run = make_run(tmp_path / "ffa", "ffa", rounds=2)
    simulate(run, 2)
    rows = log_rows(run)
    from mobiletune.fed.local import LocalClient
    from tests.fed_helpers import client_texts
    init = LocalClient(fed_bundle("mono", 4), [client_texts()[0]], tmp_path / "i",
                       log=lambda m: None).initial_adapter()
    got = final_adapter(run)
    for k, v in init.items():
        if k.endswith(".lora_A.weight"):
            np.testing.assert_array_equal(got[k], v)
        else:
            assert np.abs(got[k] - v).max() > 0
    full = sum(v.nbytes for v in init.values())
    b_bytes = sum(v.nbytes for k, v in init.items() if k.endswith(".lora_B.weight"))
    assert sum(c["bytes-up"] for c in rows[1]["clients"]) == 2 * b_bytes < 2 * full
