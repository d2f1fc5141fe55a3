"""Server-assisted side-tuning end to end on loopback: a side-tuning bundle on the phone
side (``device side-train``, a separate process) and the server (``side serve``, another),
against a single-process JAX reference; generation with the trained side weights on both
sides; reliability (kill -9 of either side, connections cut mid-body, a server that goes
away), authentication, refusals, back-pressure and TLS. Every process a test starts is
stopped by its PID."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mobiletune.errors import MobiletuneError  # noqa: E402
from mobiletune.io import safetensors as st  # noqa: E402
from mobiletune.runtime.side import protocol as P  # noqa: E402
from mobiletune.runtime.side.client import SideClient  # noqa: E402
from mobiletune.runtime.side.config import SideConfig  # noqa: E402
from tests.helpers import write_recipe  # noqa: E402
from tests.tiny import tiny_dir_with_gpt2_tokenizer  # noqa: E402

STEPS = 10
PY = [sys.executable, "-m", "mobiletune"]


def _make_env(w, side: SideConfig):
    """A tiny Llama (GPT-2 tokenizer), a side recipe (fp32 transfer: exact), its bundle."""
    from export.side_bundle import export_side
    from mobiletune import assets
    from mobiletune.train.recipe import OptimConfig, Recipe
    model = tiny_dir_with_gpt2_tokenizer(w / "model", "llama")
    (w / "data.txt").write_text(assets.read_text("botchan")[:12000], encoding="utf-8")
    recipe = Recipe(name="side", model=str(model), data=(str(w / "data.txt"),), seq_len=16,
                    micro_batch=2, accumulation=2, steps=STEPS, lora=None, side=side,
                    optim=OptimConfig(lr=3e-3, warmup_steps=0))
    write_recipe(w / "recipe.py", recipe)
    export_side(recipe, w / "bundle", (1, 2))
    (w / "token").write_text("phone 0123456789abcdef0123456789abcdef\n")
    (w / "token").chmod(0o600)
    return w, recipe


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The ladder side network."""
    return _make_env(tmp_path_factory.mktemp("side"),
                     SideConfig(reduction=2, precision="fp32", window=2))


@pytest.fixture(scope="module")
def cut_env(tmp_path_factory):
    """The ``cut`` side network: LoRA on a server copy of the top layer (of 2)."""
    return _make_env(tmp_path_factory.mktemp("side-cut"),
                     SideConfig(cut=1, rank=4, precision="fp32", window=2))


@contextmanager
def server(env, out, *extra, kill=False):
    """``mobiletune side serve`` on a free loopback port; yields (url, Popen)."""
    w, _ = env
    (Path(out) / "server.json").unlink(missing_ok=True)
    p = subprocess.Popen([*PY, "side", "serve", str(w / "recipe.py"), "--out", str(out),
                          "--port", "0", "--token-file", str(w / "token"),
                          "--checkpoint-every", "3", *extra],
                         stdout=subprocess.DEVNULL, stderr=open(Path(out).parent / f"{Path(out).name}.log", "ab"))
    try:
        deadline = time.monotonic() + 120
        while not (Path(out) / "server.json").exists():
            assert p.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield json.loads((Path(out) / "server.json").read_text())["url"], p
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL if kill else signal.SIGTERM)
        p.wait(timeout=120)


def phone(env, url, out, *extra, wait=True):
    w, _ = env
    cmd = [*PY, "device", "side-train", str(w / "bundle"), "--data", str(w / "data.txt"),
           "--server", url, "--token-file", str(w / "token"), "--out", str(out),
           "--battery", "none", "--max-offline", "60", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _reference(env, d):
    """An uninterrupted run: (server dir, phone dir)."""
    with server(env, d / "srv") as (url, _):
        r = phone(env, url, d / "phone")
        assert r.returncode == 0, r.stderr[-3000:]
    return d / "srv", d / "phone"


@pytest.fixture(scope="module")
def reference_run(env, tmp_path_factory):
    return _reference(env, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def cut_reference_run(cut_env, tmp_path_factory):
    return _reference(cut_env, tmp_path_factory.mktemp("cut-ref"))


KINDS = pytest.mark.parametrize("kind", ["ladder", "cut"])


def _runs(request, kind):
    """(env, reference_run) of the ladder or the ``cut`` side network."""
    pre = "" if kind == "ladder" else "cut_"
    return request.getfixturevalue(pre + "env"), request.getfixturevalue(pre + "reference_run")


def _trained(weights: dict) -> float:
    """The largest |value| of what starts at zero (``side.up`` or the adapter's B)."""
    return max(float(np.abs(v).max()) for k, v in weights.items()
               if k == "side.up.weight" or k.endswith(".lora_B.weight"))


@KINDS
def test_server_training_equals_a_single_process_jax_reference(request, kind):
    """10 steps of the server on the phone's (LiteRT, fp32) activations against the side
    network trained in one JAX process on JAX's activations of the same batches."""
    env, reference_run = _runs(request, kind)
    from mobiletune.formats.loading import load_model
    from mobiletune.models import side as SD
    from mobiletune.runtime import data as D
    from mobiletune.runtime.runner import open_bundle
    from mobiletune.side.steps import SideSteps
    from mobiletune.train.optim import make_optimizer
    w, recipe = env
    srv, _ = reference_run
    m = load_model(recipe.model)
    base = {k: jnp.asarray(v) for k, v in m.params.items()}
    man = open_bundle(w / "bundle").manifest
    prep = D.prepare([w / "data.txt"], m.tokenizer, D.DataConfig.from_dict(man.data))
    it = D.BatchIterator(prep.train, 1, recipe.seed, batch_size=recipe.batch_size)
    steps = SideSteps(m.cfg, recipe.side, make_optimizer(recipe.optim_config(), m.cfg.family))
    state = steps.init({k: jnp.asarray(v) for k, v in
                        SD.init_side(m.cfg, recipe.side, jax.random.PRNGKey(recipe.seed)).items()})
    ref, first, init = [], None, state.trainable
    for _ in range(STEPS):
        acc = steps.zero_accum(state.trainable)
        for _ in range(recipe.batch_size // 2):  # the phone's variant: the largest, 2
            b = {k: jnp.asarray(v) for k, v in it.next(2).items()}
            taps, last = SD.backbone_taps(base, m.cfg, recipe.side, b["inputs"])
            first = first or (b, taps, last)
            acc = steps.accumulate(acc, state.trainable, base, b, taps, last)
        state, loss = steps.apply(state, acc)
        ref.append(float(loss))
    got = [json.loads(x)["loss"] for x in (srv / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == STEPS
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-5, (got, ref)
    # it learns: the first batch's NLL is lower under the trained side network than the fresh one
    assert steps.nll(state.trainable, base, *first)[0] < steps.nll(init, base, *first)[0]


@KINDS
def test_phone_generation_with_side_weights_equals_jax(request, kind):
    """The phone's side-aware ``infer`` (LiteRT side signatures; with ``cut``, the block
    chain with the adapter folded in) against ``models.side.side_logits`` with the trained
    weights: logits within 1e-4."""
    env, reference_run = _runs(request, kind)
    from mobiletune.formats.loading import load_model
    from mobiletune.models import side as SD
    from mobiletune.runtime.runner import open_bundle
    from mobiletune.runtime.side.infer import SideInfer, load_side_weights
    w, recipe = env
    _, ph = reference_run
    runner = open_bundle(w / "bundle")
    weights = load_side_weights(ph / "side.safetensors", runner.manifest)
    assert _trained(weights) > 0  # it trained
    tokens = [464, 1468, 17195, 373, 257]
    got = SideInfer(runner, weights).infer(tokens, len(tokens) - 1)
    m = load_model(recipe.model)
    ref = SD.side_logits({k: jnp.asarray(v) for k, v in weights.items()},
                         {k: jnp.asarray(v) for k, v in m.params.items()}, m.cfg, recipe.side,
                         jnp.asarray([tokens], jnp.int32))[0, -1]
    assert np.abs(got - np.asarray(ref)).max() <= 1e-4


@KINDS
def test_desktop_and_phone_generate_the_same_tokens(request, kind):
    env, reference_run = _runs(request, kind)
    w, _ = env
    _, ph = reference_run
    args = ["--prompt", "The old sailor", "--max-new-tokens", "6"]
    dev = subprocess.run([*PY, "device", "generate", str(w / "bundle"), "--side-weights",
                          str(ph / "side.safetensors"), *args], capture_output=True, text=True)
    desk = subprocess.run([*PY, "generate", "--model", str(w / "model"), "--side", str(ph), *args],
                          capture_output=True, text=True)
    assert dev.returncode == 0 and desk.returncode == 0, dev.stderr + desk.stderr
    assert dev.stdout == desk.stdout and dev.stdout.strip()


class CuttingProxy:
    """A loopback TCP proxy that cuts every ``every``-th connection once ``after`` bytes
    have come from the client (mid-body of the third upload or so: the client reconnects,
    and the next connection is cut again further on)."""

    def __init__(self, upstream: str, every: int = 1, after: int = 30_000):
        host, port = upstream.split("//")[1].split(":")
        self.up = (host, int(port))
        self.every, self.after, self.n, self.cuts = every, after, 0, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.n += 1
            limit = self.after if self.n % self.every == 0 else None
            threading.Thread(target=self._pipe, args=(c, limit), daemon=True).start()

    def _pipe(self, c, limit):
        try:
            u = socket.create_connection(self.up, timeout=30)
        except OSError:
            c.close()
            return
        def back():
            try:
                while data := u.recv(65536):
                    c.sendall(data)
            except OSError:
                pass
            finally:
                c.close()
        threading.Thread(target=back, daemon=True).start()
        sent = 0
        try:
            while data := c.recv(65536):
                if limit is not None and sent + len(data) > limit:
                    u.sendall(data[: limit - sent])
                    self.cuts += 1
                    break
                u.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            u.close()
            c.close()

    def close(self):
        self.stop = True
        self.sock.close()


def _received(srv: Path) -> int:
    spool = srv / "spool"
    return len(list(spool.glob("*.safetensors"))) if spool.exists() else 0


def _steps_trained(srv: Path) -> int:
    m = srv / "metrics.jsonl"
    return m.read_text().count("\n") if m.exists() else 0


def _serve(env, srv: Path, port: int):
    w, _ = env
    (srv / "server.json").unlink(missing_ok=True)
    return subprocess.Popen([*PY, "side", "serve", str(w / "recipe.py"), "--out", str(srv),
                             "--port", str(port), "--token-file", str(w / "token"),
                             "--checkpoint-every", "3"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _same_as_reference(ref_srv: Path, srv: Path, out: Path) -> None:
    a, b = st.load(ref_srv / "side.safetensors"), st.load(out / "side.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ra = [json.loads(x)["loss"] for x in (ref_srv / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x)["loss"] for x in (srv / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb


def _wait(cond, procs, timeout=300):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "stuck"
        time.sleep(0.05)


@KINDS
def test_kill9_of_either_side_and_cut_bodies_end_bit_identical(request, kind, tmp_path):
    """The phone killed with SIGKILL and resumed, the server killed with SIGKILL and
    restarted (the phone retries meanwhile), and a proxy cutting every third connection
    mid-body: the final side weights and every step's loss equal the uninterrupted run's."""
    env, reference_run = _runs(request, kind)
    ref_srv, _ = reference_run
    srv, out = tmp_path / "srv", tmp_path / "phone"
    srv.mkdir()
    port = socket.create_server(("127.0.0.1", 0))
    port, _ = port.getsockname()[1], port.close()
    procs = []
    sp = _serve(env, srv, port)
    proxy = CuttingProxy(f"http://127.0.0.1:{port}")
    try:
        _wait(lambda: (srv / "server.json").exists(), [sp])
        p = phone(env, proxy.url, out, wait=False)
        procs = [sp, p]
        _wait(lambda: _received(srv) >= 5, procs)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p = phone(env, proxy.url, out, "--resume", wait=False)
        procs = [sp, p]
        _wait(lambda: _steps_trained(srv) >= 4, procs)
        os.kill(sp.pid, signal.SIGKILL)  # the server dies mid-run; the phone retries
        sp.wait()
        sp = _serve(env, srv, port)
        procs = [sp, p]
        assert p.wait(timeout=300) == 0
    finally:
        proxy.close()
        for q in procs:
            if q.poll() is None:
                os.kill(q.pid, signal.SIGKILL if q is not sp else signal.SIGTERM)
            q.wait(timeout=120)
    assert proxy.cuts >= 1
    _same_as_reference(ref_srv, srv, out)


def test_refusals(env, tmp_path):
    """A wrong token is 401 and trains nothing; a bundle from another recipe is refused
    (409) naming what differs; a cut or changed body and a wrong tensor are 400 naming it."""
    w, recipe = env
    with server(env, tmp_path / "srv") as (url, _):
        bad = tmp_path / "bad-token"
        bad.write_text("phone not-the-right-token-at-all\n")
        bad.chmod(0o600)
        r = subprocess.run([*PY, "device", "side-train", str(w / "bundle"), "--data",
                            str(w / "data.txt"), "--server", url, "--token-file", str(bad),
                            "--out", str(tmp_path / "o"), "--battery", "none"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "unauthorized (401)" in r.stderr
        c = SideClient(url, "0123456789abcdef0123456789abcdef", "phone")
        with pytest.raises(MobiletuneError, match=r"409.*recipe 'ffff'"):
            c.open_session("ffff", P.side_config_hash(recipe.side.to_dict()), "x")
        status = c.open_session(recipe.fingerprint(), P.side_config_hash(recipe.side.to_dict()), "x")
        assert status["received_through"] == 0
        k, n = 2, recipe.seq_len
        good = {"inputs": np.zeros((k, n), np.int32), "targets": np.zeros((k, n), np.int32),
                "loss_mask": np.ones((k, n), np.float32),
                P.last_name("x"): np.zeros((k, n, 30), np.float32),
                **{P.tap_name(j, "x"): np.zeros((k, n, 30), np.float32) for j in range(2)}}
        meta = {"seq": 1, "k": k, "step": 0, "done": 2, "cursor": "{}"}
        wrong = {**good, P.tap_name(1, "x"): np.zeros((k, n, 29), np.float32)}
        with pytest.raises(MobiletuneError, match=r"400.*'tap.1.x' is float32\[2, 16, 29\]"):
            c.put_batch(1, st.dumps(wrong, meta))
        # the last hidden state travels at side.last_precision (fp32), never at the taps' width
        int8_last = {**{k_: v for k_, v in good.items() if k_ != P.last_name("x")},
                     P.last_name("q"): np.zeros((k, n, 30), np.int8),
                     P.last_name("scale"): np.ones((k, n), np.float32)}
        with pytest.raises(MobiletuneError, match=r"400.*'last\."):
            c.put_batch(1, st.dumps(int8_last, meta))
        payload = st.dumps(good, meta)
        status, _, data = c.request("PUT", P.batch_path("phone", 1), payload,
                                    {P.SHA_HEADER: P.sha256(payload[:-1])})
        assert status == 400 and b"sha256" in data
        assert c.status()["received_through"] == 0 and c.status()["side_step"] == 0
        c.close()


def test_back_pressure_keeps_the_spool_bounded(env, tmp_path):
    """A trainer that cannot keep up: after ``max_queue`` untrained micro-batches the
    server answers 429 (the client waits Retry-After), and the spool never holds more."""
    from mobiletune.side.server import SideService, make_server
    from mobiletune.side.trainer import SideTrainer
    w, recipe = env
    trainer = SideTrainer(recipe, tmp_path / "srv")
    gate = threading.Event()
    train = trainer.train
    trainer.train = lambda *a: (gate.wait(), train(*a))[1]
    svc = SideService(trainer, "phone", "0123456789abcdef0123456789abcdef", max_queue=2)
    httpd = make_server(svc, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        c = SideClient(url, "0123456789abcdef0123456789abcdef", "phone", sleep=lambda s: None)
        k, n = 2, recipe.seq_len
        t = {"inputs": np.zeros((k, n), np.int32), "targets": np.zeros((k, n), np.int32),
             "loss_mask": np.ones((k, n), np.float32), P.last_name("x"): np.zeros((k, n, 30), np.float32),
             **{P.tap_name(j, "x"): np.zeros((k, n, 30), np.float32) for j in range(2)}}
        for seq in (1, 2, 3):  # the trainer holds seq 1: 1 and 2 wait, 3 is refused
            body = st.dumps(t, {"seq": seq, "k": k, "step": (seq - 1) // 2, "done": 2, "cursor": "{}"})
            if seq < 3:
                c.put_batch(seq, body)
            else:
                status, r, _ = c._once("PUT", P.batch_path("phone", seq), body,
                                       {P.SHA_HEADER: P.sha256(body)})
                assert status == 429 and r.getheader("Retry-After")
        assert len(list((tmp_path / "srv" / "spool").glob("*"))) == 2
        gate.set()
        c.put_batch(3, body)  # once the trainer moves, the same request is taken
        c.close()
    finally:
        gate.set()
        httpd.shutdown()
        httpd.server_close()


def test_an_unreachable_server_stops_the_phone_with_its_cursor(env, reference_run, tmp_path):
    """No server: the phone says so and sends nothing (exit 2). A server that goes away
    mid-run: the phone retries with backoff, then stops (exit 3) with its cursor saved, and
    ``--resume`` against the server brought back ends where the uninterrupted run did."""
    ref_srv, _ = reference_run
    free = socket.create_server(("127.0.0.1", 0))
    port, _ = free.getsockname()[1], free.close()
    r = phone(env, f"http://127.0.0.1:{port}", tmp_path / "o", "--max-offline", "2")
    assert r.returncode == 2 and "no answer" in r.stderr and "retrying in" in r.stderr
    srv, out = tmp_path / "srv", tmp_path / "phone"
    srv.mkdir()
    sp = _serve(env, srv, port)
    p = None
    try:
        _wait(lambda: (srv / "server.json").exists(), [sp])
        p = phone(env, f"http://127.0.0.1:{port}", out, "--max-offline", "3", wait=False)
        _wait(lambda: _received(srv) >= 4, [sp, p])
        os.kill(sp.pid, signal.SIGTERM)  # a clean stop: it trains what it holds, then exits
        sp.wait(timeout=120)
        assert p.wait(timeout=120) == 3
        assert list((out / "checkpoints").glob("step-*")), "no cursor checkpoint"
        sp = _serve(env, srv, port)
        _wait(lambda: (srv / "server.json").exists(), [sp])
        r = phone(env, f"http://127.0.0.1:{port}", out, "--resume")
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        for q in (sp, p):
            if q is not None and q.poll() is None:
                os.kill(q.pid, signal.SIGTERM)
                q.wait(timeout=120)
    _same_as_reference(ref_srv, srv, out)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from tests.helpers import self_signed_cert
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


def test_tls_on_loopback(env, tmp_path, certs):
    with server(env, tmp_path / "srv", "--tls-cert", str(certs / "cert.pem"), "--tls-key",
                str(certs / "key.pem")) as (url, _):
        assert url.startswith("https://")
        r = phone(env, url, tmp_path / "o", "--steps", "2", "--cafile", str(certs / "cert.pem"))
        assert r.returncode == 0, r.stderr[-2000:]
        r = phone(env, url, tmp_path / "o2", "--steps", "2")
        assert r.returncode == 2 and "certificate does not verify" in r.stderr


def test_side_weights_that_do_not_match_the_bundle_are_refused(env, reference_run, tmp_path):
    """``device generate --side-weights``: a missing tensor, an extra one, a wrong shape and a
    non-side bundle each give one error line naming the file and tensor (exit 2)."""
    w, _ = env
    _, ph = reference_run
    good = st.load(ph / "side.safetensors", mmap=False)
    cases = {"missing": {k: v for k, v in good.items() if k != "side.up.weight"},
             "extra": {**good, "side.bogus": np.zeros(3, np.float32)},
             "shape": {**good, "side.up.weight": good["side.up.weight"][:, :-1].copy()}}
    want = {"missing": "'side.up.weight' is missing", "extra": "'side.bogus' is not part of this bundle",
            "shape": "'side.up.weight' is float32"}
    for name, tensors in cases.items():
        f = tmp_path / f"{name}.safetensors"
        st.save(f, tensors)
        r = subprocess.run([*PY, "device", "generate", str(w / "bundle"), "--side-weights", str(f),
                            "--prompt", "the", "--max-new-tokens", "2"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert str(f) in r.stderr and want[name] in r.stderr, (name, r.stderr[-500:])
