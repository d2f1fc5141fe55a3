"""What the federated tests share: tiny LoRA bundles (exported once per process, a
prime-sized random Llama with GPT-2's tokenizer, warmup + cosine schedule so the schedule
position matters), small client texts, the numpy references, and the pieces of a loopback
deployment (ports, processes stopped by process group, bounded waits)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ = 16


@functools.cache
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="mobiletune-fed-"))


@functools.cache
def tiny_model() -> Path:
    from tests.tiny import tiny_dir_with_gpt2_tokenizer
    return tiny_dir_with_gpt2_tokenizer(_root() / "model", "llama")


def fed_recipe(rank: int = 4, **kw):
    from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe
    return Recipe(**{"name": "fed-tiny", "model": str(tiny_model()), "data": ("unused",),
                     "seq_len": SEQ, "micro_batch": 2, "accumulation": 1, "steps": 12,
                     "lora": LoraConfig(r=rank, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
                     "optim": OptimConfig(lr=3e-3, warmup_steps=2, schedule="cosine",
                                          total_steps=12, weight_decay=0.01), **kw})


@functools.cache
def fed_bundle(kind: str = "mono", rank: int = 4) -> Path:
    """A tiny LoRA bundle (variants 1, 2): ``kind`` mono or sharded, LoRA rank ``rank``."""
    from export.monolithic_bundle import export_bundle
    from export.sharded_bundle import export_sharded
    out = _root() / f"bundle-{kind}-r{rank}"
    if kind == "mono":
        export_bundle(fed_recipe(rank), out, variants=(1, 2), verify=False)
    else:
        export_sharded(fed_recipe(rank), out, variants=(1, 2), verify=False)
    return out


@functools.cache
def client_texts(n: int = 3) -> list[Path]:
    """``n`` different small texts (Botchan slices), one per client."""
    from mobiletune import assets
    text = assets.read_text("botchan")
    out = []
    for i in range(n):
        p = _root() / f"client{i}.txt"
        p.write_text(text[i * 3000:(i + 1) * 3000], encoding="utf-8")
        out.append(p)
    return out


def random_lora(rng, out_dim: int, in_dim: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng.standard_normal((r, in_dim)).astype(np.float32),
            rng.standard_normal((out_dim, r)).astype(np.float32))


def make_run(out: Path, method: str = "fedavg", clients: int = 2, rounds: int = 2,
             ranks=(), dropout: float = 0.0, local_steps: int = 2, kind: str = "mono",
             **spec) -> Path:
    """A run directory for the tiny bundles (``kind`` mono or sharded): two Shakespeare
    roles per client count (the smallest roles of two plays, LEAF style), profiles,
    fed.json."""
    from mobiletune.fed import partition as PT
    from mobiletune.fed import profiles as P
    from mobiletune.fed import spec as S
    cl = PT.shakespeare_roles(clients, plays=["macbeth", "tempest"], min_chars=3000, top=False)
    cl = [{**c, "train": c["train"][:6000], "val": c["val"][:1500]} for c in cl]
    PT.write(out, cl, None, "txt", {"partition": "shakespeare-roles"})
    bundles = {f"r{r}": str(fed_bundle(kind, r)) for r in sorted({4, *ranks})}
    profs = {f"d{i}": P.DeviceProfile(lora_rank=r, dropout=dropout) for i, r in enumerate(ranks or [None])}
    P.write(out / P.FILE, P.Profiles(1, profs, list(profs)))  # seed 1: at dropout 0.3, partition 0 drops out of round 1
    S.write(out, S.RunSpec(method=method, rounds=rounds, local_steps=local_steps, clients=clients,
                           bundles=bundles, default_bundle="r4", eval_max_examples=8,
                           round_timeout_s=300, **spec))
    return out


def final_adapter(run: Path) -> dict:
    from mobiletune.io import safetensors as st
    return st.load(run / "adapter" / "adapter_model.safetensors")


def log_rows(run: Path) -> list[dict]:
    import json
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def kill_server_after_round(run: Path, clients: int, rnd: int = 1, timeout_s: float = 240) -> None:
    """Run ``simulate(run, clients)`` in a process of its own session, SIGKILL it (and the
    Ray processes it started) as soon as round ``rnd`` is logged; fails if it ended first."""
    code = f"from mobiletune.fed.sim import simulate; simulate({str(run)!r}, {clients})"
    p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and p.poll() is None:
            if (run / "metrics.jsonl").exists() and any(r["round"] == rnd for r in log_rows(run)):
                break
            time.sleep(0.05)
        assert p.poll() is None, f"the run ended before round {rnd} was logged"
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    assert max(r["round"] for r in log_rows(run)) == rnd


# --- a loopback deployment (tests/test_fed_deploy.py, tests/test_arm64.py) -------------------
ROOT = Path(__file__).resolve().parent.parent


def flower_pin() -> str:
    """The Flower version pyproject's ``fed`` extra pins (read from the file, independently of
    the code under test)."""
    import re
    return re.search(r'"flwr\[simulation\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Processes started each in its own session (logs ``d/NAME.log``), stopped by process
    group id."""

    def __init__(self, d: Path, env: dict):
        self.d, self.env, self.p = d, env, {}

    def start(self, name, cmd):
        log = open(self.d / f"{name}.log", "w")
        self.p[name] = subprocess.Popen(cmd, cwd=self.d, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        return self.p[name]

    def stop(self, name, sig=signal.SIGTERM):
        p = self.p[name]
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)

    def stop_all(self):
        for name in list(self.p):
            self.stop(name, signal.SIGKILL)


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def deploy_env(d: Path, port: int, ca) -> dict:
    """The environment of this machine's Flower processes (this checkout importable, the
    venv's ``flower-*`` tools on PATH), and ``flwr``'s config naming the SuperLink."""
    from mobiletune.fed import deploy as D
    D.write_flwr_config(d / "flwr-home", f"127.0.0.1:{port}", ca)
    return {**os.environ, **D.ENV, "FLWR_HOME": str(d / "flwr-home"),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}


def registered(d: Path, env: dict, key: Path) -> bool:
    """Registers ``key.pub`` with the SuperLink; True once it answers that it did."""
    from mobiletune.fed import deploy as D
    r = subprocess.run(D.register_cmd(f"{key}.pub"), cwd=d, env=env, capture_output=True, text=True)
    return r.returncode == 0 and "registered successfully" in r.stdout


def online(d: Path, env: dict) -> int:
    """How many SuperNodes the SuperLink lists as online (``flwr supernode list``)."""
    import json
    r = subprocess.run(["flwr", "supernode", "list", "deploy", "--format", "json"], cwd=d, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        return 0
    try:
        nodes = json.loads(r.stdout[r.stdout.index("{"):])["nodes"]
    except (ValueError, KeyError):
        return 0
    return sum(n["status"] == "online" for n in nodes)
