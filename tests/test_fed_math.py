"""The federated wire contract and aggregation math against independent numpy references:
FedAvg of K clients is the example-weighted mean; FlexLoRA's low-rank aggregation equals the
dense Σ p_i s_i B_i A_i, its redistribution at the full rank is exact and at lower ranks is
the truncated SVD (Eckart-Young); malformed updates are rejected with a reason naming the key."""

import numpy as np
import pytest

from mobiletune.fed import adapter as W
from mobiletune.fed import aggregate as G
from tests.fed_helpers import random_lora

MODS = {"model.layers.0.self_attn.q_proj": (37, 29), "model.layers.1.mlp.down_proj": (23, 41)}


def wire(rng, r, scale=1.0):
    out = {}
    for m, (o, i) in MODS.items():
        a, b = random_lora(rng, o, i, r)
        out[W.PREFIX + m + W.A_SUFFIX], out[W.PREFIX + m + W.B_SUFFIX] = a, b * scale
    return out


def test_fedavg_is_the_example_weighted_mean():
    rng = np.random.default_rng(0)
    ups = [wire(rng, 4) for _ in range(5)]
    n = [3, 11, 1, 7, 250]
    got = G.weighted_mean(ups, n)
    for k in ups[0]:
        ref = sum(np.float64(w) * u[k].astype(np.float64) for u, w in zip(ups, n)) / sum(n)
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], ref.astype(np.float32))  # float64 sum, one rounding


def test_flexlora_lowrank_equals_dense_and_redistributes_by_truncated_svd():
    rng = np.random.default_rng(1)
    ranks, n = [2, 4, 8], [5.0, 1.0, 2.0]
    lora = {"r": 8, "alpha": 16, "use_rslora": False}
    ups = [wire(rng, r) for r in ranks]
    scales = [W.lora_scale(lora, r) for r in ranks]
    svds = G.flexlora_aggregate(ups, n, scales, keep=sum(ranks))
    for m, (o, i) in MODS.items():
        dense = sum(w / sum(n) * s * u[W.PREFIX + m + W.B_SUFFIX].astype(np.float64)
                    @ u[W.PREFIX + m + W.A_SUFFIX].astype(np.float64)
                    for u, w, s in zip(ups, n, scales))
        u_, s_, vt_ = np.linalg.svd(dense)
        np.testing.assert_allclose(svds[W.PREFIX + m][1], s_[:sum(ranks)], rtol=1e-9, atol=1e-9)
        for r in (14, 8, 4, 2, 1):                     # 14 = the aggregate's rank: exact
            ad = G.flexlora_adapter(svds, r, W.lora_scale(lora, r))
            got = W.lora_scale(lora, r) * (ad[W.PREFIX + m + W.B_SUFFIX].astype(np.float64)
                                           @ ad[W.PREFIX + m + W.A_SUFFIX].astype(np.float64))
            ref = (u_[:, :r] * s_[:r]) @ vt_[:r]       # best rank-r approximation
            np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(dense).max())
            if r == 14:
                np.testing.assert_allclose(got, dense, atol=2e-5 * np.abs(dense).max())


def test_flexlora_never_forms_the_dense_matrix(monkeypatch):
    """The aggregation's largest intermediate is (out + in) × Σr, not out × in."""
    rng = np.random.default_rng(2)
    big = {"m": (3000, 2000)}
    ups = []
    for r in (4, 8):
        a, b = random_lora(rng, 3000, 2000, r)
        ups.append({"m" + W.A_SUFFIX: a, "m" + W.B_SUFFIX: b})
    seen = []
    real_svd = np.linalg.svd
    monkeypatch.setattr(np.linalg, "svd", lambda x, *a, **k: seen.append(x.shape) or real_svd(x, *a, **k))
    svds = G.flexlora_aggregate(ups, [1, 1], [2.0, 1.0], keep=8)
    assert seen == [(12, 12)] and svds["m"][0].shape == (3000, 8) and big


def test_ffa_payload_is_b_only():
    rng = np.random.default_rng(3)
    w = wire(rng, 4)
    b = G.b_only(w)
    assert set(b) == {k for k in w if k.endswith(W.B_SUFFIX)} and W.num_bytes(b) < W.num_bytes(w)


@pytest.mark.parametrize("damage, reason", [
    (lambda u, k: u.pop(k), "is missing"),
    (lambda u, k: u.__setitem__("base_model.model.extra.lora_A.weight", u[k]), "is not part of the adapter"),
    (lambda u, k: u.__setitem__(k, u[k][:, :-1]), "has shape"),
    (lambda u, k: u.__setitem__(k, u[k].astype(np.float64)), "has dtype float64"),
    (lambda u, k: u[k].__setitem__((0, 0), np.nan), "non-finite"),
    (lambda u, k: u[k].__setitem__((0, 0), np.inf), "non-finite"),
])
def test_malformed_updates_are_rejected_with_a_reason(damage, reason):
    rng = np.random.default_rng(4)
    good = wire(rng, 4)
    expected = W.shapes(good)
    W.validate(good, expected)
    bad = {k: v.copy() for k, v in good.items()}
    key = sorted(bad)[1]
    damage(bad, key)
    with pytest.raises(W.UpdateRejected, match=reason):
        W.validate(bad, expected, "node 7")


def test_names_round_trip_between_state_and_wire():
    state = {"trainable/model.layers.0.q_proj.lora_A.weight": np.ones((2, 3), np.float32),
             "trainable/model.layers.0.q_proj.lora_B.weight": np.ones((4, 2), np.float32),
             "opt/1/0/mu/model.layers.0.q_proj.lora_A.weight": np.ones((2, 3), np.float32),
             "acc_nll": np.zeros((), np.float32)}
    w = W.to_wire(state)
    assert sorted(w) == ["base_model.model.model.layers.0.q_proj.lora_A.weight",
                         "base_model.model.model.layers.0.q_proj.lora_B.weight"]
    assert sorted(W.to_state_names(w)) == sorted(k for k in state if k.startswith("trainable/"))
