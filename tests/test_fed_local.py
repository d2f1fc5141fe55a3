"""The phone's side of a round (``mobiletune.fed.local.LocalClient``) on real LiteRT bundles:
with one client, FedAvg and the optimizer state carried, R rounds of S steps are the
``device train`` run of R·S steps (monolithic and sharded); FedProx's proximal term works
through the accumulators of both bundle kinds; a re-sent round rewinds to its start."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mobiletune.fed import adapter as W  # noqa: E402
from mobiletune.fed import aggregate as G  # noqa: E402
from mobiletune.fed.local import LocalClient, RoundConfig  # noqa: E402
from mobiletune.io import safetensors as st  # noqa: E402
from mobiletune.runtime.device_trainer import device_train  # noqa: E402
from tests.fed_helpers import client_texts, fed_bundle  # noqa: E402

R, S = 3, 2


def federate_one(bundle, data, out, cfg, rounds=R):
    """R rounds of FedAvg with one client (the server's real aggregation of one update)."""
    c = LocalClient(bundle, [data], out, log=lambda m: None)
    g = c.initial_adapter()
    for rnd in range(1, rounds + 1):
        res = c.train_round(g, cfg, rnd)
        g = G.weighted_mean([res.adapter], [res.num_examples])
    return c, g


@pytest.mark.parametrize("kind", ["mono", "sharded"])
def test_one_client_fedavg_equals_the_single_phone_run(kind, tmp_path):
    bundle, data = fed_bundle(kind), client_texts()[0]
    ref = device_train(bundle, [data], tmp_path / "ref", steps=R * S, battery="none")
    assert ref.finished
    want = st.load(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    _, got = federate_one(bundle, data, tmp_path / "fed", RoundConfig(steps=S))
    assert set(got) == set(want)
    worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert worst <= 1e-5, worst
    # the reset policy is a different run (moments and schedule restart each round)
    _, reset = federate_one(bundle, data, tmp_path / "reset", RoundConfig(steps=S, optimizer_state="reset"))
    assert max(float(np.abs(reset[k] - want[k]).max()) for k in want) > 1e-4


def test_fedprox_works_on_monolithic_and_sharded_bundles(tmp_path):
    data = client_texts()[1]
    out = {}
    for kind in ("mono", "sharded"):
        for mu in (0.0, 50.0):
            _, out[kind, mu] = federate_one(fed_bundle(kind), data, tmp_path / f"{kind}{mu}",
                                            RoundConfig(steps=3, mu=mu), rounds=2)
    c = LocalClient(fed_bundle("mono"), [data], tmp_path / "init", log=lambda m: None)
    init = c.initial_adapter()
    for mu in (0.0, 50.0):   # the two bundle kinds compute the same proximal step
        for k in init:
            np.testing.assert_allclose(out["sharded", mu][k], out["mono", mu][k], atol=2e-5, err_msg=k)

    def drift(a):  # how far round 2 moved from round 1's global is what mu penalises
        return sum(float(np.sum((a[k] - init[k]) ** 2)) for k in init)
    assert drift(out["mono", 50.0]) < 0.9 * drift(out["mono", 0.0])


def test_fedprox_adds_mu_times_the_distance_to_the_global_gradient(tmp_path):
    """The accumulators after the hook minus before = mu * count * (w - w_global)."""
    c = LocalClient(fed_bundle("sharded"), [client_texts()[0]], tmp_path / "c", log=lambda m: None)
    g = c.initial_adapter()
    c.train_round(g, RoundConfig(steps=2), 1)
    seen = []
    real = c.runner.apply

    def spy():
        seen.append({k: np.array(v) for k, v in c.runner.get_state().items()})
        return real()
    hook = c._before_apply(RoundConfig(steps=1, mu=0.3), {k: np.zeros_like(v) for k, v in W.to_state_names(g).items()})
    c.runner.apply = spy
    c.trainer.hooks.before_apply = None
    c.runner.accumulate(c.trainer.data.next(2))
    before = {k: np.array(v) for k, v in c.runner.get_state().items()}
    hook(c.trainer)
    after = {k: np.array(v) for k, v in c.runner.get_state().items()}
    n = float(before["acc_count"])
    for k in W.to_state_names(g):
        acc = "acc/" + k[len("trainable/"):]
        np.testing.assert_allclose(after[acc] - before[acc], 0.3 * n * before[k], rtol=1e-5, atol=1e-7)


def test_a_round_sent_again_rewinds_to_its_start(tmp_path):
    bundle, data = fed_bundle("mono"), client_texts()[2]
    c = LocalClient(bundle, [data], tmp_path / "c", log=lambda m: None)
    g = c.initial_adapter()
    r1 = c.train_round(g, RoundConfig(steps=2), 1)
    r2 = c.train_round(r1.adapter, RoundConfig(steps=2), 2)
    again = LocalClient(bundle, [data], tmp_path / "c", log=lambda m: None)   # a restarted phone
    r2b = again.train_round(r1.adapter, RoundConfig(steps=2), 2)
    for k in r2.adapter:
        np.testing.assert_array_equal(r2b.adapter[k], r2.adapter[k])


def test_reset_policy_zeroes_moments_and_keeps_the_schedule():
    from mobiletune.fed.local import moment_leaves
    from mobiletune.runtime.runner import open_bundle
    for kind in ("mono", "sharded"):
        names = list(open_bundle(fed_bundle(kind)).get_state())
        reset = set(moment_leaves(dict.fromkeys(names)))
        opt = {n for n in names if n.startswith("opt/")}
        assert {n for n in opt if "/mu/" in n or "/nu/" in n} <= reset
        kept = opt - reset
        assert kept and all(n.endswith("/count") for n in kept)          # the schedule's count
        assert len([n for n in reset if n.endswith("/count")]) == len(kept)  # Adam's, one per group


def phone_steps(c, seconds):
    """Every optimizer step takes the phone ``seconds`` on its clock (deterministic)."""
    from mobiletune.runtime.energy.clocks import SimClock
    c.clock.advance = lambda s: SimClock.advance(c.clock, seconds)


def test_a_straggler_stops_at_the_round_deadline(tmp_path):
    c = LocalClient(fed_bundle("mono"), [client_texts()[0]], tmp_path / "c", log=lambda m: None)
    phone_steps(c, 60.0)
    res = c.train_round(c.initial_adapter(), RoundConfig(steps=6, deadline_s=150.0), 1, bytes_down=10_000,
                        transfer=lambda n, up: 0.5)
    m = res.metrics
    assert m["deadline-hit"] == 1 and m["stopped"] == 1 and m["steps"] == 3
    assert res.num_examples == 3 * c.m.effective_batch
    assert m["download-s"] == m["upload-s"] == 0.5 and m["compute-s"] == 180.0
    assert m["round-s"] == 181.0


def test_battery_pauses_inside_a_round_and_energy_comes_from_the_trace(tmp_path):
    trace = tmp_path / "trace.csv"   # 4 W while discharging; below 20 % at 150 s, charging at 400 s
    trace.write_text("time,level,charging,temperature,current_a,voltage_v\n0,60,false,30,1.0,4.0\n"
                     "150,15,false,30,1.0,4.0\n400,30,true,30,1.0,4.0\n")
    c = LocalClient(fed_bundle("mono"), [client_texts()[0]], tmp_path / "c", battery=f"trace:{trace}",
                    log=lambda m: None)
    phone_steps(c, 60.0)
    c.trainer.poll_s = 30.0
    res = c.train_round(c.initial_adapter(), RoundConfig(steps=5), 1)
    m = res.metrics
    assert m["paused"] == 1 and m["steps"] == 5 and m["stopped"] == 0
    assert m["energy-measured"] == 3                         # steps at 0-180 s, on battery
    # 4 W × 60 s for each; the two steps while charging use the profile's 3 W × their compute
    assert m["energy-j"] == pytest.approx(4.0 * 60.0 * 3, abs=3.0)
