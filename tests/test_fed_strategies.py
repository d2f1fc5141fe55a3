"""The server strategies on Flower Messages, without an engine: FedAvg of K replies is the
example-weighted mean (and arrival order does not matter); FedProx's server side is FedAvg
(μ goes to the phone); malformed, wrong-shaped, NaN or errored replies are rejected with a
logged reason and never aggregated; FedAdam is Flower's and its state survives a checkpoint;
FlexLoRA sends each node its own rank."""

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from mobiletune.fed import adapter as W  # noqa: E402
from mobiletune.fed import strategies as T  # noqa: E402
from mobiletune.fed.records import from_record, to_record  # noqa: E402
from tests.fed_helpers import random_lora  # noqa: E402

LORA = {"r": 4, "alpha": 8, "use_rslora": False}
MODS = {"base_model.model.model.layers.0.self_attn.q_proj": (31, 17),
        "base_model.model.model.layers.0.mlp.down_proj": (17, 43)}


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def adapter(rng, r=4):
    out = {}
    for m, (o, i) in MODS.items():
        out[m + W.A_SUFFIX], out[m + W.B_SUFFIX] = random_lora(rng, o, i, r)
    return out


def reply(node, wire, n, pid=None, **metrics):
    q = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({"arrays": to_record(wire), "metrics": MetricRecord(
        {"num-examples": n, "partition-id": node if pid is None else pid, "train-loss": 1.0,
         **metrics})}), reply_to=q)


def test_fedavg_of_k_replies_is_the_weighted_mean_in_any_order():
    rng = np.random.default_rng(0)
    ups, n = [adapter(rng) for _ in range(4)], [12, 3, 40, 5]
    expected = W.shapes(ups[0])
    outs = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        s = T.make("fedavg", expected, LORA)
        arrays, metrics = s.aggregate_train(1, [reply(i + 1, ups[i], n[i]) for i in order])
        outs.append(from_record(arrays))
        assert metrics["num-examples"] == sum(n)
    for k in expected:
        ref = sum(np.float64(w) * u[k].astype(np.float64) for u, w in zip(ups, n)) / sum(n)
        np.testing.assert_array_equal(outs[0][k], ref.astype(np.float32))
        np.testing.assert_array_equal(outs[1][k], outs[0][k])


def test_fedprox_server_is_fedavg_and_sends_mu():
    rng = np.random.default_rng(1)
    ups = [adapter(rng) for _ in range(3)]
    expected = W.shapes(ups[0])
    a, _ = T.make("fedavg", expected, LORA).aggregate_train(1, [reply(i + 1, u, 5 + i) for i, u in enumerate(ups)])
    b, _ = T.make("fedprox", expected, LORA, mu=0.0).aggregate_train(1, [reply(i + 1, u, 5 + i) for i, u in enumerate(ups)])
    for k in expected:
        np.testing.assert_array_equal(from_record(a)[k], from_record(b)[k])
    assert T.make("fedprox", expected, LORA, mu=0.25).proximal_mu == 0.25


def test_bad_updates_are_rejected_with_reasons_and_never_aggregated():
    rng = np.random.default_rng(2)
    good = [adapter(rng) for _ in range(2)]
    expected = W.shapes(good[0])
    nan = {k: v.copy() for k, v in good[0].items()}
    nan[sorted(nan)[0]][0, 0] = np.nan
    short = {k: v for k, v in good[0].items() if not k.endswith("down_proj" + W.B_SUFFIX)}
    shape = {**good[0], sorted(good[0])[1]: np.zeros((3, 3), np.float32)}
    q = Message(RecordDict(), dst_node_id=9, message_type=MessageType.TRAIN)
    replies = [reply(1, good[0], 10), reply(2, good[1], 30), reply(3, nan, 10), reply(4, short, 10),
               reply(5, shape, 10), reply(6, good[1], 0), Message(Error(code=1, reason="phone died"), reply_to=q)]
    s = T.make("fedavg", expected, LORA)
    arrays, metrics = s.aggregate_train(1, replies)
    reasons = {r["node"]: r["reason"] for r in s.round_log["rejected"]}
    assert "non-finite" in reasons[3] and "is missing" in reasons[4] and "has shape" in reasons[5]
    assert "num-examples" in reasons[6]
    assert [f["node"] for f in s.round_log["failed"]] == [9] and "phone died" in s.round_log["failed"][0]["reason"]
    assert metrics["clients"] == 2
    got = from_record(arrays)
    for k in expected:   # only the two good updates
        ref = (10 * good[0][k].astype(np.float64) + 30 * good[1][k].astype(np.float64)) / 40
        np.testing.assert_array_equal(got[k], ref.astype(np.float32))


def test_fedadam_is_flowers_and_its_state_round_trips():
    rng = np.random.default_rng(3)
    g0 = adapter(rng)
    expected = W.shapes(g0)
    s = T.make("fedadam", expected, LORA, eta=0.1)
    s.current_arrays = {k: v.copy() for k, v in g0.items()}   # what configure_train sets
    ups = [adapter(rng) for _ in range(2)]
    a1, _ = s.aggregate_train(1, [reply(i + 1, u, 4) for i, u in enumerate(ups)])
    # Adam's first step from zero moments (Flower's defaults b1=0.9, b2=0.99 and its
    # bias-corrected rate at round t: eta·sqrt(1-b2^(t+1))/(1-b1^(t+1))), d the mean's delta
    eta_t = 0.1 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)
    for k in expected:
        d = (ups[0][k].astype(np.float64) + ups[1][k]) / 2 - g0[k]
        m, v = 0.1 * d, 0.01 * d * d
        np.testing.assert_allclose(from_record(a1)[k], g0[k] + eta_t * m / (np.sqrt(v) + 1e-3),
                                   rtol=1e-4, atol=1e-5)
    s2 = T.make("fedadam", expected, LORA, eta=0.1)
    s2.load_state(s.state())
    for name in ("m_t", "v_t"):
        for k in expected:
            np.testing.assert_array_equal(getattr(s2, name)[k], getattr(s, name)[k])


def test_flexlora_aggregates_mixed_ranks_and_reports_its_svd_state():
    rng = np.random.default_rng(4)
    ups = [adapter(rng, 2), adapter(rng, 4)]
    expected = W.shapes(ups[1])
    s = T.make("flexlora", expected, LORA)
    arrays, _ = s.aggregate_train(1, [reply(1, ups[0], 10, **{"lora-rank": 2}),
                                      reply(2, ups[1], 10, **{"lora-rank": 4})])
    got = from_record(arrays)
    assert all(got[k].shape == expected[k] for k in expected)
    s2 = T.make("flexlora", expected, LORA)
    s2.load_state(s.state())
    for k, v in s2.global_adapter(2).items():
        np.testing.assert_array_equal(v, s.global_adapter(2)[k])
    bad = T.make("flexlora", expected, LORA)   # a rank-2 reply claiming rank 4 is rejected
    bad.aggregate_train(1, [reply(1, ups[0], 10, **{"lora-rank": 4})])
    assert "has shape" in bad.round_log["rejected"][0]["reason"]
