"""The phone side on arm64: Debian bookworm arm64 under qemu-user (``tests/arm64env.py``),
the runtime installed from an offline phone kit (``mobiletune device kit``) with the network
absent, and monolithic and sharded bundles trained there exactly as on x86.

Select alone with ``pytest -m arm64``. Needs root (apt, binfmt_misc, chroot); elsewhere it
skips with the reason, and fails with it under CI=true.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from mobiletune.io import safetensors as st  # noqa: E402
from tests.arm64env import Arm64Env, Unavailable  # noqa: E402
from tests.helpers import losses, write_recipe  # noqa: E402
from tests.tiny import tiny_dir_with_gpt2_tokenizer  # noqa: E402

pytestmark = pytest.mark.arm64

STEPS = 6
KINDS = ("mono", "sharded")
VENV = "/work/venv/bin/python"   # inside the arm64 root


@pytest.fixture(scope="session")
def arm(tmp_path_factory):
    from mobiletune import assets
    work = tmp_path_factory.mktemp("arm64")
    try:
        return Arm64Env.ensure(assets.home() / "arm64", work,
                               log=lambda s: print(s, file=sys.stderr))
    except Unavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"the arm64 environment is required under CI=true: {e}")
        pytest.skip(f"arm64 environment unavailable: {e}")


@pytest.fixture(scope="session")
def bundles(arm):
    """Tiny Llama (GPT-2 tokenizer), a LoRA recipe, both kinds of bundle, exported here."""
    from export.monolithic_bundle import export_bundle
    from export.sharded_bundle import export_sharded
    from mobiletune import assets
    from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe
    w = arm.work
    model = tiny_dir_with_gpt2_tokenizer(w / "model", "llama")
    (w / "data.txt").write_text(assets.read_text("botchan")[:12000], encoding="utf-8")
    recipe = Recipe(name="arm64", model=str(model), data=(str(w / "data.txt"),), seq_len=16,
                    micro_batch=2, steps=STEPS,
                    lora=LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
                    optim=OptimConfig(lr=1e-3, warmup_steps=0, clip_norm=1.0))
    export_bundle(recipe, w / "mono", variants=(1, 2))
    export_sharded(recipe, w / "sharded", variants=(1, 2))
    from export.side_bundle import export_side
    from mobiletune.runtime.side.config import SideConfig
    for name, scfg in (("side", SideConfig(reduction=2, precision="int8")),   # the ladder
                       ("side-cut", SideConfig(cut=1, rank=4))):               # the top-layer copy
        side = dataclasses.replace(recipe, lora=None, side=scfg)
        write_recipe(w / f"{name}.py", side)
        export_side(side, w / name, variants=(1, 2))
    return {"mono": w / "mono", "sharded": w / "sharded", "side": w / "side",
            "side-cut": w / "side-cut", "model": model, "recipe": recipe}


@pytest.fixture(scope="session")
def kit(arm, bundles):
    """The monolithic bundle's phone kit, installed in the arm64 root with no network."""
    from mobiletune.runtime.kit import build_kit
    info = build_kit(bundles["mono"], arm.work / "kit", pythons=("3.11",), tar=True,
                     log=lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    r = arm.run(["/bin/sh", "/work/kit/setup.sh", "/work/venv"], network=False)
    info["install_seconds"] = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    info["setup_output"] = r.stdout
    return info


def arm_cmd(arm, args, **kw):
    r = arm.run([VENV, "-m", "mobiletune.runtime", *args], **kw)
    assert r.returncode == 0, f"arm64 {args[:1]}: rc {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r


def x86_cmd(args):
    r = subprocess.run([sys.executable, "-m", "mobiletune.runtime", *args], capture_output=True,
                       text=True)
    assert r.returncode == 0, f"x86 {args[:1]}: rc {r.returncode}\n{r.stderr[-3000:]}"
    return r


def train_args(bundle, data, out, steps=STEPS, *extra):
    return ["train", str(bundle), "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--battery", "none", "--checkpoint-every", "1", *extra]


@pytest.fixture(scope="session")
def runs(arm, bundles, kit):
    """(x86 run dir, arm64 run dir) per kind, the same bundle and data."""
    out = {}
    for kind in KINDS:
        x = arm.work / f"x86-{kind}"
        x86_cmd(train_args(bundles[kind], arm.work / "data.txt", x))
        arm_cmd(arm, train_args(arm.inside(bundles[kind]), "/work/data.txt", f"/work/arm-{kind}"))
        out[kind] = (x, arm.work / f"arm-{kind}")
    return out


def test_kit_installs_offline(kit):
    assert kit["pythons"] == ["3.11"]
    assert any("aarch64" in w and "ai_edge_litert" in w for w in kit["wheels"]), kit["wheels"]
    assert any(w.startswith("mobiletune-") for w in kit["wheels"])
    assert "installed." in kit["setup_output"]
    # without --fed: no Flower in the kit, nor in what setup.sh suggests
    assert kit["fed"] is False and not any(w.startswith(("flwr-", "grpcio-")) for w in kit["wheels"])
    assert "flower-supernode" not in kit["setup_output"]


def test_kit_setup_refuses_termux_and_other_architectures(arm, kit):
    setup = arm.work / "kit" / "setup.sh"
    assert (arm.work / "kit.tar.gz").stat().st_size == kit["archive_bytes"]
    termux = subprocess.run(["sh", str(setup)], capture_output=True, text=True,
                            env={**os.environ, "TERMUX_VERSION": "0.118.1"})
    assert termux.returncode == 1 and "proot-distro" in termux.stderr, termux.stderr
    here = subprocess.run(["sh", str(setup)], capture_output=True, text=True)
    assert here.returncode == 1
    assert "this kit carries aarch64 wheels; this machine is x86_64" in here.stderr, here.stderr


def test_runtime_in_the_kit_imports_no_desktop_frameworks(arm, kit):
    r = arm.run([VENV, "-c", "import sys, platform, mobiletune.runtime.device_trainer; "
                             "print(platform.machine(), sorted(m for m in sys.modules if "
                             "m.split('.')[0] in ('jax', 'tensorflow', 'torch', 'flax', 'optax')))"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["aarch64", "[]"], r.stdout


def assert_same_training(x, a, steps=STEPS):
    """Run dirs ``x`` (x86) and ``a`` (arm64): per-step losses and the final state (trainable
    tensors, optimizer moments, counters) within 1e-5."""
    lx, la = losses(x), losses(a)
    assert len(lx) == len(la) == steps
    assert max(abs(p - q) for p, q in zip(lx, la)) <= 1e-5, (lx, la)
    sx, sa = st.load(x / "state.safetensors"), st.load(a / "state.safetensors")
    assert sx.keys() == sa.keys()
    for k in sx:
        np.testing.assert_allclose(sa[k], sx[k], rtol=0, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_training_on_arm64_equals_x86(runs, kind):
    assert_same_training(*runs[kind])


@pytest.fixture(scope="session")
def full_ft(arm, bundles):
    """A sharded full fine-tuning bundle: the same tiny model and recipe, no LoRA."""
    from export.sharded_bundle import export_sharded
    export_sharded(dataclasses.replace(bundles["recipe"], lora=None), arm.work / "sharded-full",
                   variants=(1, 2))
    return arm.work / "sharded-full"


def test_full_finetune_streamed_from_disk_on_arm64_equals_x86_in_ram(arm, full_ft, kit):
    """``--state-store disk`` on arm64 (params, grads and moments in the unlinked, madvised
    file), with a budget that saves every layer's residuals (block_fwd_save /
    block_bwd_saved) and the head in numpy (``--head host``), trains as x86 does with the
    state in RAM, recomputing every block, the head in LiteRT (the default)."""
    steps, w = 3, arm.work
    rx = x86_cmd(train_args(full_ft, w / "data.txt", w / "x86-full-ram", steps, "--state-store", "ram"))
    ra = arm_cmd(arm, train_args(arm.inside(full_ft), "/work/data.txt", "/work/arm-full-disk", steps,
                                 "--state-store", "disk", "--memory-budget-mb", "100000",
                                 "--head", "host"))
    assert "state: streamed through" in ra.stderr and "streamed" not in rx.stderr, ra.stderr[-2000:]
    assert re.search(r"the last (\d+) of \1 layers save their residuals", ra.stderr), ra.stderr[-2000:]
    assert_same_training(w / "x86-full-ram", w / "arm-full-disk", steps)


def _ppl(model, adapter, data) -> float:
    r = subprocess.run([sys.executable, "-m", "mobiletune", "ppl", "--model", str(model),
                        "--adapter", str(adapter), "--text", str(data), "--seq-len", "32",
                        "--max-windows", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip().splitlines()[-1].split()[0].split("=")[1])


@pytest.mark.parametrize("kind", KINDS)
def test_arm64_adapter_loads_on_the_desktop_with_the_same_perplexity(arm, bundles, runs, kind):
    x, a = runs[kind]
    assert (a / "adapter" / "adapter_config.json").is_file()
    px = _ppl(bundles["model"], x / "adapter", arm.work / "data.txt")
    pa = _ppl(bundles["model"], a / "adapter", arm.work / "data.txt")
    assert abs(pa - px) <= 1e-5 * px, (px, pa)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_on_arm64_gives_the_x86_tokens(arm, bundles, runs, kind):
    x, a = runs[kind]
    args = ["--prompt", "The old sailor", "--max-new-tokens", "6"]
    gx = x86_cmd(["generate", str(bundles[kind]), "--state", str(x), *args]).stdout
    ga = arm_cmd(arm, ["generate", arm.inside(bundles[kind]), "--state", arm.inside(a), *args]).stdout
    assert gx.strip() and ga == gx, (gx, ga)


@pytest.mark.parametrize("kind", KINDS)
def test_kill9_and_resume_on_arm64_is_bit_identical(arm, bundles, runs, kind):
    ref = runs[kind][1]
    out = arm.work / f"arm-{kind}-kill9"
    args = [VENV, "-m", "mobiletune.runtime",
            *train_args(arm.inside(bundles[kind]), "/work/data.txt", arm.inside(out))]
    with open(arm.work / f"kill9-{kind}.log", "wb") as log:
        p = arm.popen(args, stdout=log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            if (out / "metrics.jsonl").exists() and len(losses(out)) >= 3:
                break
            time.sleep(0.2)
        assert p.poll() is None, "the run ended before it could be killed"
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "state.safetensors").exists()
    r = arm.run(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step" in r.stderr
    assert losses(out) == losses(ref)
    a, b = st.load(ref / "state.safetensors"), st.load(out / "state.safetensors")
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


SCALAR_PROGRAM = """
import sys
import tensorflow as tf
spec = {"x": tf.TensorSpec([], tf.float32, name="x"), "y": tf.TensorSpec([], tf.float32, name="y")}
add = tf.function(lambda a: {"z": a["x"] + a["y"]}, input_signature=[spec], autograph=False)
tf.saved_model.save(tf.Module(), sys.argv[1] + ".saved", signatures={"add": add.get_concrete_function()})
c = tf.lite.TFLiteConverter.from_saved_model(sys.argv[1] + ".saved", signature_keys=["add"])
c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
open(sys.argv[1], "wb").write(c.convert())
"""
RAW_CALL = ("import numpy as np; from ai_edge_litert.interpreter import Interpreter; "
            "it = Interpreter(model_path={path!r}); "
            "print(it.get_signature_runner('add')(x=np.float32(1), y=np.float32(2))['z'])")
RUNNER_CALL = ("import numpy as np; from ai_edge_litert.interpreter import Interpreter; "
               "from mobiletune.runtime.litert import LiteRTCalls; "
               "from mobiletune.errors import MobiletuneError\n"
               "try:\n    LiteRTCalls(Interpreter(model_path={path!r}), 'scalar.tflite')"
               "('add', {{'x': np.float32(1), 'y': np.float32(2)}})\n"
               "except MobiletuneError as e:\n    print('refused:', e)")


def test_litert_230_scalar_input_crash_is_reproduced_and_refused(arm, kit):
    """The unmodified wheel segfaults on a 0-d signature input on arm64 (x86 tolerates it);
    the project's runner refuses such a program with a clear error instead."""
    prog = arm.work / "scalar.tflite"
    r = subprocess.run([sys.executable, "-c", SCALAR_PROGRAM, str(prog)], capture_output=True,
                       text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    x86 = subprocess.run([sys.executable, "-c", RAW_CALL.format(path=str(prog))],
                         capture_output=True, text=True)
    assert x86.returncode == 0 and x86.stdout.strip() == "3.0", x86.stderr
    raw = arm.run([VENV, "-c", RAW_CALL.format(path=arm.inside(prog))])
    assert raw.returncode == -signal.SIGSEGV, (raw.returncode, raw.stdout, raw.stderr[-500:])
    ours = arm.run([VENV, "-c", RUNNER_CALL.format(path=arm.inside(prog))])
    assert ours.returncode == 0, ours.stderr[-1000:]
    assert "refused:" in ours.stdout and "'x' is 0-d" in ours.stdout, ours.stdout


@pytest.mark.parametrize("kind", ["side", "side-cut"])
def test_one_side_tuning_round_from_arm64(arm, bundles, kit, kind):
    """The arm64 phone (the kit's runtime, networking on for loopback) runs a side-tuning
    bundle's forward for two optimizer steps against an x86 ``side serve``, and fetches
    side weights that the same steps from an x86 phone reproduce (within 1e-5); generation
    with the x86 run's weights gives the same tokens on both. Both side networks: the ladder and the
    top-layer copy (whose generation folds the adapter into the phone's weights)."""
    w = arm.work
    (w / "token").write_text("phone 0123456789abcdef0123456789abcdef\n")
    (w / "token").chmod(0o600)
    weights, runs = {}, {where: w / f"{kind}-run-{where}" for where in ("arm64", "x86")}
    for where in ("arm64", "x86"):
        srv = w / f"{kind}-server-{where}"
        p = subprocess.Popen([sys.executable, "-m", "mobiletune", "side", "serve", str(w / f"{kind}.py"),
                              "--out", str(srv), "--port", "0", "--token-file", str(w / "token")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (srv / "server.json").exists():
                assert p.poll() is None and time.monotonic() < deadline, "no side server"
                time.sleep(0.1)
            url = json.loads((srv / "server.json").read_text())["url"]
            if where == "arm64":
                r = arm.run([VENV, "-m", "mobiletune.runtime", "side-train", arm.inside(bundles[kind]),
                             "--data", "/work/data.txt", "--server", url, "--token-file", "/work/token",
                             "--out", arm.inside(runs[where]), "--steps", "2", "--battery", "none"],
                            network=True)
                assert r.returncode == 0, r.stdout + r.stderr[-3000:]
            else:
                x86_cmd(["side-train", str(bundles[kind]), "--data", str(w / "data.txt"), "--server", url,
                         "--token-file", str(w / "token"), "--out", str(runs[where]),
                         "--steps", "2", "--battery", "none"])
        finally:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=120)
        weights[where] = st.load(runs[where] / "side.safetensors")
    assert weights["arm64"].keys() == weights["x86"].keys()
    assert max(np.abs(v).max() for k, v in weights["arm64"].items()
               if k == "side.up.weight" or k.endswith(".lora_B.weight")) > 0
    for k in weights["x86"]:
        np.testing.assert_allclose(weights["arm64"][k], weights["x86"][k], rtol=0, atol=1e-5, err_msg=k)
    args = ["--prompt", "The old sailor", "--max-new-tokens", "4"]
    gx = x86_cmd(["generate", str(bundles[kind]), "--side-weights",
                  str(runs["x86"] / "side.safetensors"), *args]).stdout
    ga = arm_cmd(arm, ["generate", arm.inside(bundles[kind]), "--side-weights",   # the same file
                       arm.inside(runs["x86"] / "side.safetensors"), *args]).stdout
    assert gx.strip() and ga == gx, (gx, ga)


def test_doctor_on_arm64(arm, bundles, kit):
    r = arm.run([VENV, "-m", "mobiletune.runtime", "doctor", arm.inside(bundles["sharded"]),
                 "--battery", "none"])
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "aarch64" in r.stdout and "XNNPACK:" in r.stdout and "predicted step" in r.stdout
    assert "ok: no problems found" in r.stdout


FED_VENV = "/work/fedvenv"       # inside the arm64 root: the --fed kit's runtime + Flower


@pytest.fixture(scope="session")
def fed_kit(arm):
    """The federated tests' tiny bundle packed with ``--fed`` (runtime + plain Flower) and
    installed in its own venv in the arm64 root, with no network."""
    from mobiletune.runtime.kit import build_kit
    from tests.fed_helpers import fed_bundle
    info = build_kit(fed_bundle("mono"), arm.work / "fedkit", pythons=("3.11",), tar=False,
                     fed=True, log=lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    r = arm.run(["/bin/sh", "/work/fedkit/setup.sh", FED_VENV], network=False, timeout=900)
    info["install_seconds"] = time.perf_counter() - t0
    print(f"arm64: the --fed kit installed in {info['install_seconds']:.0f} s", file=sys.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    info["setup_output"] = r.stdout
    return info


def test_fed_kit_carries_plain_flower(fed_kit):
    from tests.fed_helpers import flower_pin
    pin = flower_pin()
    assert fed_kit["fed"] is True and f"flwr=={pin}" in fed_kit["requirements"]
    assert f"flwr-{pin}-py3-none-any.whl" in fed_kit["wheels"]
    assert any(w.startswith("grpcio-") and "aarch64" in w for w in fed_kit["wheels"]), fed_kit["wheels"]
    assert not any(w.startswith("ray-") for w in fed_kit["wheels"])      # no simulation engine
    assert "installed." in fed_kit["setup_output"] and "flower-supernode" in fed_kit["setup_output"]


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
                    reason="needs openssl and ssh-keygen")
def test_flower_supernode_on_arm64_in_a_tls_deployment_equals_the_simulation(arm, fed_kit):
    """An x86 SuperLink (TLS, SuperNode authentication), one SuperNode in the arm64 root (the
    --fed kit's venv, its own copy of the run directory naming the kit's bundle) and one on x86,
    ``flwr run`` of two FedAvg rounds: the arm64 node trains in both rounds, and the final
    global adapter equals the same run on Flower's simulation engine (all x86) within 1e-5."""
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    from mobiletune.fed import deploy as D
    from mobiletune.fed import spec as S
    from tests.fed_helpers import (
        Procs,
        deploy_env,
        final_adapter,
        free_port,
        log_rows,
        make_run,
        online,
        registered,
        wait_for,
    )
    t0 = time.perf_counter()
    w = arm.work / "fed"
    run = make_run(w / "run", "fedavg", clients=2, rounds=2)
    ref = make_run(w / "ref", "fedavg", clients=2, rounds=2)
    phone = w / "phone-run"          # partition 1's phone: its own copy, the kit's bundle
    shutil.copytree(run, phone)
    spec = S.read(phone)
    S.write(phone, dataclasses.replace(spec, bundles={k: "/work/fedkit/bundle" for k in spec.bundles}))
    d = w / "deploy"
    d.mkdir()
    c = D.certs(d)
    keys = [D.node_key(d, f"node{i}") for i in range(2)]
    app = D.write_app(d / "app")
    port = free_port()
    env = deploy_env(d, port, c["ca"])
    link = f"127.0.0.1:{port}"
    P = Procs(d, env)
    try:
        P.start("superlink", D.superlink_cmd(c, port, d / "state.db"))
        for k in keys:
            wait_for(lambda: registered(d, env, k), 60, f"registering {k.name}")
        P.start("node0-x86", D.supernode_cmd(c["ca"], link, free_port(), keys[0], 0, run))
        P.start("node1-arm64", arm.argv(
            D.supernode_cmd(arm.inside(c["ca"]), link, free_port(), arm.inside(keys[1]), 1,
                            arm.inside(phone)),
            network=True, env={**D.ENV, "PATH": f"{FED_VENV}/bin:/usr/bin:/bin"}))
        # min_nodes is 1: start the run once both are online, or round 1 may go without arm64
        wait_for(lambda: online(d, env) == 2, 180, "both SuperNodes online")
        t_up = time.perf_counter()
        flwr = P.start("flwr-run", D.run_cmd(app, run))
        flwr.wait(timeout=300)
        t_run = time.perf_counter()
        log = "\n".join((d / f"{n}.log").read_text()[-2000:] for n in ("flwr-run", "node1-arm64"))
        assert flwr.returncode == 0, log
    finally:
        P.stop_all()
    rows = log_rows(run)
    assert [r["round"] for r in rows] == [0, 1, 2], log
    pids = [sorted(int(x["partition-id"]) for x in r["clients"]) for r in rows[1:]]
    assert pids == [[0, 1], [0, 1]], (pids, log)
    assert (phone / "clients" / "client-001").is_dir() and not (run / "clients" / "client-001").exists()

    sim = subprocess.run([sys.executable, "-c", f"from mobiletune.fed.sim import simulate; "
                          f"simulate({str(ref)!r}, 2)"], capture_output=True, text=True, timeout=600)
    assert sim.returncode == 0, sim.stderr[-3000:]
    a, b = final_adapter(run), final_adapter(ref)
    assert a.keys() == b.keys()
    assert max(np.abs(b[k]).max() for k in b) > 0
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)
    print(f"arm64 fed: setup + both nodes online {t_up - t0:.0f} s, flwr run (2 rounds) "
          f"{t_run - t_up:.0f} s, simulation reference {time.perf_counter() - t_run:.0f} s",
          file=sys.stderr)
