"""SplitLoRA (``mobiletune.runtime.split`` on the phone, ``mobiletune.fed.split`` on the
server) on the tiny sharded LoRA bundle of ``tests/fed_helpers.py`` (3 layers, LoRA on
q/v/down, cut at layer 2 unless said): one split step through LiteRT + JAX gives the loss
and every LoRA gradient of ``jax.grad`` of the whole model (≤ 1e-5 relative per tensor, to
its largest |g|); a few steps of two clients on the shared server adapter equal a
single-process JAX run of the same schedule (≤ 1e-5 absolute); the same step over loopback
HTTPS with token auth; wrong-shaped payloads refused naming the tensor; the server half
resumes from its checkpointed state; two simulated federated rounds on 2 clients, and a
ServerApp killed after round 1 resumes to the same final adapter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mobiletune.errors import MobiletuneError  # noqa: E402
from mobiletune.fed import split as SP  # noqa: E402
from mobiletune.formats.loading import load_model  # noqa: E402
from mobiletune.io import http as H  # noqa: E402
from mobiletune.runtime import bundle as B  # noqa: E402
from mobiletune.runtime.runner import open_bundle  # noqa: E402
from mobiletune.runtime.split import protocol as P  # noqa: E402
from mobiletune.runtime.split.runner import SplitClient, SplitRunner, client_names  # noqa: E402
from mobiletune.train.loss import batch_nll  # noqa: E402
from mobiletune.train.optim import make_optimizer  # noqa: E402
from mobiletune.train.setup import build_steps  # noqa: E402
from tests.fed_helpers import SEQ, fed_bundle, fed_recipe  # noqa: E402

SECRET = "0123456789abcdef0123456789abcdef"
TOKEN = P.device_token(SECRET, "d0")     # device d0's own bearer token
CUT = 2


@pytest.fixture(scope="module")
def ref():
    """(steps, initial trainable with random B so every gradient is non-zero, frozen). The
    sharded bundle is the session's (``fed_helpers.fed_bundle``, shared with test_fed_local)."""
    fed_bundle("sharded")
    r = fed_recipe(4)
    steps, tr, fr = build_steps(r, load_model(r.model, seed=r.seed))
    rng = np.random.default_rng(7)
    tr = {k: (jnp.asarray(0.05 * rng.standard_normal(v.shape), jnp.float32)
              if k.endswith("lora_B.weight") else v) for k, v in tr.items()}
    return steps, tr, fr


def batch(seed: int, k: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, 107, (k, SEQ)).astype(np.int32),
            "targets": rng.integers(0, 107, (k, SEQ)).astype(np.int32),
            "loss_mask": (rng.random((k, SEQ)) > 0.25).astype(np.float32)}


_OPEN: dict = {}


def phone(tr: dict, slot: int = 0):
    """The sharded bundle's LiteRT runner number ``slot`` (opened once per module), its whole
    state reset to the bundle's with the trainable tensors ``tr``."""
    if slot not in _OPEN:
        runner = open_bundle(fed_bundle("sharded"), threads=1)
        _OPEN[slot] = (runner, {k: np.array(v) for k, v in runner.get_state().items()})
    runner, init = _OPEN[slot]
    runner.set_state({**init, **{B.TRAINABLE + k: np.asarray(v) for k, v in tr.items()}})
    return runner


def server(tr: dict):
    """The split server at ``CUT`` (built and jitted once per module), reset to ``tr``."""
    if "server" not in _OPEN:
        _OPEN["server"] = SP.SplitServer(fed_bundle("sharded"), CUT)
    s = _OPEN["server"]
    s.lora = {t: jnp.asarray(tr[t]) for t in s.names}
    s.opt_state, s.step = s.tx.init(s.lora), 0
    s.zero()
    return s


def rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def test_one_split_step_equals_jax_grad_of_the_whole_model(ref):
    steps, tr, fr = ref
    srv = server(tr)
    svc = SP.SplitService(srv, SECRET)
    sr = SplitRunner(phone(tr), CUT, SP.DirectLink(svc, "d0"))
    b = batch(1)
    nll, count = sr.accumulate(b)
    jb = {k: jnp.asarray(v) for k, v in b.items()}
    want, grads = jax.value_and_grad(lambda t: batch_nll({**fr, **t}, steps.cfg, jb,
                                                         steps.lcfg.ctx())[0])(tr)
    assert abs(nll - float(want)) <= 1e-5 * abs(float(want))
    assert count == b["loss_mask"].sum()
    mine = set(client_names(sr.manifest, CUT))
    assert mine and set(srv.names) and mine | set(srv.names) == set(grads)
    assert not mine & set(srv.names)
    for k, g in grads.items():
        got = sr.grad[k] if k in mine else srv.acc[k]
        assert np.abs(np.asarray(g)).max() > 0, k
        assert rel_err(got, g) <= 1e-5, (k, rel_err(got, g))
    assert sr.bytes_up > b["inputs"].size * 30 * 4 and sr.bytes_down > 0


def test_steps_of_two_clients_equal_a_single_process_jax_reference(ref):
    """SplitFed-v2 schedule: client 0 takes 2 steps, then client 1 (its own phone-side
    state, from the same start) 2 steps, against one shared server adapter; each side
    divides by the token count, clips its own gradient and steps the recipe's AdamW."""
    steps, tr, fr = ref
    srv = server(tr)
    svc = SP.SplitService(srv, SECRET)
    mine = client_names(phone(tr).manifest, CUT)
    optim = fed_recipe(4).optim
    tx = make_optimizer(optim, steps.cfg.family)
    s_par = {t: tr[t] for t in srv.names}
    s_opt = tx.init(s_par)
    got, want = {}, {}
    for dev, seeds in (("d0", (10, 11)), ("d1", (20, 21))):
        sr = SplitRunner(phone(tr), CUT, SP.DirectLink(svc, dev))
        c_par = {t: tr[t] for t in mine}
        c_opt = tx.init(c_par)
        for seed in seeds:
            b = batch(seed)
            sr.accumulate(b)
            sr.apply()
            jb = {k: jnp.asarray(v) for k, v in b.items()}
            g = jax.grad(lambda t: batch_nll({**fr, **t}, steps.cfg, jb, steps.lcfg.ctx())[0])(
                {**c_par, **s_par})
            n = float(b["loss_mask"].sum())
            for par, opt, which in ((c_par, c_opt, "c"), (s_par, s_opt, "s")):
                gg = {t: g[t] / n for t in par}
                upd, new_opt = tx.update(gg, opt, par)
                new = {t: par[t] + upd[t] for t in par}
                if which == "c":
                    c_par, c_opt = new, new_opt
                else:
                    s_par, s_opt = new, new_opt
        state = sr.get_state()
        got.update({(dev, t): np.array(state[B.TRAINABLE + t]) for t in mine})
        want.update({(dev, t): c_par[t] for t in mine})
    got.update({("server", t): v for t, v in srv.lora.items()})
    want.update({("server", t): s_par[t] for t in srv.names})
    worst = max(float(np.abs(np.asarray(got[k]) - np.asarray(want[k])).max()) for k in want)
    moved = min(float(np.abs(np.asarray(want[k]) - np.asarray(tr[k[1]])).max()) for k in want)
    assert worst <= 1e-5, worst
    assert moved > 1e-4, moved          # every tensor moved: the comparison means something
    assert srv.step == 4


def test_the_server_half_resumes_from_its_checkpointed_state(ref, tmp_path):
    """``state()`` (LoRA + optax state + step, what the ServerApp checkpoints each round)
    written and read back through the checkpoint store, then the same steps: the same
    adapter bit for bit."""
    from mobiletune.runtime.state_checkpoints import Checkpoints
    _, tr, _ = ref
    srv = server(tr)

    def step(seed):
        b = batch(seed)
        srv.forward_backward(np.zeros((2, SEQ, 30), np.float32) + b["loss_mask"][..., None],
                             b["targets"], b["loss_mask"])
        srv.apply()
    step(30)
    ck = Checkpoints(tmp_path / "ck", keep=1, log=lambda m: None)
    ck.save(1, {f"strategy/split/{k}": v for k, v in srv.state().items()}, {})
    step(31)
    step(32)
    want = {t: np.asarray(v) for t, v in srv.lora.items()}
    _, saved, _ = ck.latest()
    srv.load_state({k[len("strategy/split/"):]: v for k, v in saved.items()})
    assert srv.step == 1
    step(31)
    step(32)
    for t in want:
        np.testing.assert_array_equal(np.asarray(srv.lora[t]), want[t], err_msg=t)
    with pytest.raises(MobiletuneError, match="split server checkpoint: key 'lora/"):
        srv.load_state({})


def test_a_split_step_over_loopback_https_with_token_auth(ref, tmp_path):
    """The same bytes over HTTP/1.1 + TLS on 127.0.0.1 give the same step as the in-process
    call; a wrong token is a 401, an untrusted certificate and a bad body are refused."""
    from tests.helpers import self_signed_cert
    certs = self_signed_cert(tmp_path)
    steps, tr, fr = ref
    b = batch(3)
    direct = SplitRunner(phone(tr, 1), CUT, SP.DirectLink(SP.SplitService(server(tr), SECRET), "d0"))
    want = direct.accumulate(b)
    svc = SP.SplitService(server(tr), SECRET)     # the same server, reset
    httpd, url = SP.start(svc, "127.0.0.1", 0, certs / "cert.pem", certs / "key.pem")
    try:
        assert url.startswith("https://127.0.0.1:")
        untrusted = SplitClient(url, TOKEN, "d0", log=lambda m: None)
        with pytest.raises(MobiletuneError, match="certificate does not verify"):
            untrusted.exchange(1, 0, b"x")
        client = SplitClient(url, TOKEN, "d0", cafile=certs / "cert.pem", log=lambda m: None)
        sr = SplitRunner(phone(tr), CUT, client)
        assert sr.accumulate(b) == want
        for k in client_names(sr.manifest, CUT):
            np.testing.assert_array_equal(sr.grad[k], direct.grad[k])
        assert client.bytes_sent == sr.bytes_up and client.bytes_received >= sr.bytes_down
        assert svc.take_bytes() == ({"d0": sr.bytes_up}, {"d0": sr.bytes_down})
        sr.apply()
        assert svc.server.step == 1
        zeros = P.encode({"h": np.zeros((2, SEQ, 30), np.float32)})
        bad = SplitClient(url, "f" * 32, "d0", cafile=certs / "cert.pem", log=lambda m: None)
        with pytest.raises(MobiletuneError, match="401"):
            bad.exchange(2, 0, zeros)
        # d0's token does not authenticate another device, nor d1's token d0
        for token, dev in ((TOKEN, "d1"), (P.device_token(SECRET, "d1"), "d0")):
            other = SplitClient(url, token, dev, cafile=certs / "cert.pem", log=lambda m: None)
            with pytest.raises(MobiletuneError, match="401"):
                other.exchange(2, 0, zeros)
        assert svc.server.step == 1 and svc.open_device is None   # nothing was accumulated
        h = sr.inner.hidden_states(b["inputs"], CUT)[-1]
        body = P.encode({"h": h[:, :, :-1], "targets": b["targets"], "loss_mask": b["loss_mask"]})
        with pytest.raises(MobiletuneError, match=r"400.*tensor 'h' is float32\[2, 16, 29\], "
                                                  r"expected float32\[2, 16, 30\]"):
            client.exchange(2, 0, body)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_wrong_shaped_payloads_are_refused_naming_the_tensor(ref):
    _, tr, _ = ref
    svc = SP.SplitService(server(tr), SECRET)
    b = batch(4)
    good = {"h": np.zeros((2, SEQ, 30), np.float32), "targets": b["targets"],
            "loss_mask": b["loss_mask"]}
    for change, msg in ((dict(h=np.zeros((2, SEQ, 31), np.float32)), "tensor 'h' is float32"),
                        (dict(loss_mask=np.zeros((2, SEQ - 1), np.float32)), "tensor 'loss_mask'"),
                        (dict(h=np.full((2, SEQ, 30), np.nan, np.float32)), "'h' has non-finite"),
                        (dict(extra=np.zeros(1, np.float32)), "tensor 'extra' is not expected"),
                        (dict(targets=b["targets"] + 10 ** 6), "'targets' has token ids outside")):
        body = P.encode({**good, **change})
        with pytest.raises(H.Refused, match=msg) as e:
            svc.exchange("d0", 1, 0, body, H.sha256(body))
        assert e.value.code == 400
    body = P.encode(good)
    with pytest.raises(H.Refused, match="sha256"):
        svc.exchange("d0", 1, 0, body, "0" * 64)

    class WrongAnswer:                 # a server answering a wrong-shaped gradient
        def exchange(self, step, micro, body):
            return P.encode({"dh": np.zeros((2, SEQ, 7), np.float32), "nll": np.float32(1),
                             "count": np.float32(1)})

        def apply(self, step):
            return {"server_step": step}
    sr = SplitRunner(phone(tr), CUT, WrongAnswer())
    with pytest.raises(MobiletuneError, match=r"tensor 'dh' is float32\[2, 16, 7\], expected "
                                              r"float32\[2, 16, 30\]"):
        sr.accumulate(b)
    for cut in (0, 3):
        with pytest.raises(MobiletuneError, match=rf"cut={cut}: must be an integer in \[1, 2\]"):
            SP.SplitServer(fed_bundle("sharded"), cut)
    with pytest.raises(MobiletuneError, match="monolithic"):
        client_names(dataclasses.replace(sr.manifest, sharded=None), 1)


@pytest.fixture(scope="module")
def split2(tmp_path_factory):
    """Two SplitLoRA rounds of 2 clients on Flower's simulation engine, uninterrupted."""
    pytest.importorskip("ray")
    from mobiletune.fed.sim import simulate
    from tests.fed_helpers import make_run
    run = make_run(tmp_path_factory.mktemp("split") / "run", "splitlora", clients=2, rounds=2,
                   kind="sharded", cut=CUT)
    simulate(run, 2)
    return run


def test_simulated_splitlora_rounds_on_two_clients(split2):
    """Flower's simulation engine: 2 phones (Ray actors, LiteRT, HTTP to the ServerApp's
    cut endpoint on 127.0.0.1) train rounds of 2 steps one after the other."""
    from tests.fed_helpers import final_adapter, log_rows
    run = split2
    rows = log_rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    r1 = rows[1]
    assert r1["accepted"] == 2 and not r1["rejected"] and not r1["failed"], r1
    c = r1["clients"]
    assert all(x["steps"] == 2 and x["cut-bytes-up"] > 0 and x["cut-bytes-down"] > 0 for x in c)
    # the server's count of the cut traffic equals the phones' (the same bodies)
    assert r1["cut-bytes-up"] == sum(x["cut-bytes-up"] for x in c)
    assert r1["cut-bytes-down"] == sum(x["cut-bytes-down"] for x in c)
    assert r1["bytes-up"] > r1["cut-bytes-up"] and r1["bytes-down"] > r1["cut-bytes-down"]
    assert r1["round-s"] >= sum(x["round-s"] for x in c)     # one client after the other
    assert r1["val-loss"] != rows[0]["val-loss"]
    got = final_adapter(run)
    runner = phone({})
    init = {"base_model.model." + k[len(B.TRAINABLE):]: v for k, v in runner.get_state().items()
            if k.startswith(B.TRAINABLE)}
    assert set(got) == set(init)                 # both halves in the final adapter
    for k in init:                               # every B factor moved, the phones' and the server's
        if k.endswith("lora_B.weight"):
            assert np.abs(got[k] - init[k]).max() > 0, k
    print(f"splitlora round 1: bytes up {r1['bytes-up']} (cut {r1['cut-bytes-up']}), "
          f"down {r1['bytes-down']} (cut {r1['cut-bytes-down']})")


def test_killed_splitlora_server_resumes_with_the_same_final_adapter(split2, tmp_path):
    """SIGKILL of the ServerApp (and the Ray actors it started) after round 1 is logged;
    the resumed run (the server half from its round-1 checkpoint, the phones rewound to
    the round's start) ends with the uninterrupted run's adapter, both halves."""
    from mobiletune.fed.sim import simulate
    from tests.fed_helpers import final_adapter, kill_server_after_round, log_rows, make_run
    run = make_run(tmp_path / "killed", "splitlora", clients=2, rounds=2, kind="sharded", cut=CUT)
    kill_server_after_round(run, 2)
    simulate(run, 2)
    assert [r["round"] for r in log_rows(run)] == [0, 1, 2]
    a, b = final_adapter(split2), final_adapter(run)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
