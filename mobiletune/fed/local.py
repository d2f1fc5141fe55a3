"""A phone's part of one federated round, on a LiteRT bundle (numpy + ai-edge-litert; no
Flower, no JAX, no TensorFlow): take the global adapter, train S optimizer steps with the
device trainer (battery scheduler on), return the adapter, its example count and what the
round cost the phone.

State across rounds lives in the client's directory as the device trainer's checkpoints
(trainable tensors, optimizer state, step, data position) plus ``fed.json`` (the
simulated clock, the round), so a client restarted between rounds (a new Flower ClientApp
process, a rebooted phone) continues where it was. ``optimizer_state``:

* ``"carry"`` (default): the optimizer's moments and schedule position persist across
  rounds; only the trainable tensors are replaced by the global adapter. With one client
  and FedAvg this makes R rounds of S steps the same run as R·S steps of ``device train``
  (``tests/test_fed_local.py``).
* ``"reset"``: each round starts with fresh Adam moments (zero ``mu``/``nu`` and Adam's own
  step count, for its bias correction) while the learning-rate schedule keeps its
  position, as a fresh optimizer per round on the global schedule.

Method hooks (``DeviceTrainer.hooks``): FedProx adds μ·(w − w_global) to the step's
gradient through the accumulators before ``apply`` (the bundle divides them by the token
count, so μ·count·(w − w_global) is added: a monolithic and a sharded bundle alike, no new
signature); FFA-LoRA zeroes the A factors' gradients and restores A after ``apply``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.fed import adapter as W
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.runtime import bundle as B
from mobiletune.runtime import data as D
from mobiletune.runtime.device_trainer import DeviceTrainer, Hooks, info
from mobiletune.runtime.energy.clocks import SimClock
from mobiletune.runtime.metrics import peak_rss_mb, rss_mb
from mobiletune.runtime.state_checkpoints import Checkpoints

OPT_POLICIES = ("carry", "reset")
FED_STATE = "fed.json"


class PhoneClock(SimClock):
    """Simulated phone seconds: measured compute × the profile's ``speed``; sleeps and
    transfers add as they are."""

    def __init__(self, speed: float = 1.0, start: float = 0.0):
        super().__init__(start)
        self.speed = float(speed)

    def advance(self, s: float) -> None:
        super().advance(s * self.speed)

    def sleep(self, s: float) -> None:
        super().advance(s)


@dataclass
class RoundConfig:
    steps: int                          # local optimizer steps S
    mu: float = 0.0                     # FedProx's proximal weight
    optimizer_state: str = "carry"      # carry | reset
    frozen_a: bool = False              # FFA-LoRA: A stays as the bundle's (shared seed)
    deadline_s: float | None = None     # phone seconds from the round's start

    def __post_init__(self):
        if self.optimizer_state not in OPT_POLICIES:
            raise MobiletuneError(f"optimizer_state={self.optimizer_state!r}: expected one of "
                                  f"{OPT_POLICIES}")
        if type(self.steps) is not int or self.steps < 1:
            raise MobiletuneError(f"local steps={self.steps!r}: must be a positive integer")
        if not (isinstance(self.mu, (int, float)) and self.mu >= 0):
            raise MobiletuneError(f"proximal mu={self.mu!r}: must be >= 0")


@dataclass
class RoundResult:
    adapter: dict                       # wire names -> float32 arrays (FFA: B only)
    num_examples: int
    metrics: dict = field(default_factory=dict)
    # metrics: steps, train-loss, step-time-s (measured here), phone-step-time-s,
    # compute-s (phone seconds of the local phase: steps, throttle sleeps and battery
    # pauses), download-s / upload-s (the profile's link), round-s (their sum), bytes-down /
    # bytes-up (arrays), rss-avg-mb / rss-peak-mb, energy-j (energy-measured: how many steps
    # the battery measured; the rest use the profile's power), paused, stopped, deadline-hit


class LocalClient:
    """One phone: a bundle, its local data, and a directory that holds its state."""

    def __init__(self, bundle, data_paths, out, *, battery: str = "none", speed: float = 1.0,
                 memory_budget_mb: float | None = None, threads: int | None = None,
                 power_w: float = 3.0, log=info):
        self.bundle, self.out, self.log = Path(bundle), Path(out), log
        self.power_w = float(power_w)
        self.out.mkdir(parents=True, exist_ok=True)
        self.clock = PhoneClock(speed, self._fed_state().get("clock", 0.0))
        self.trainer = DeviceTrainer.open(bundle, data_paths, self.out, battery=battery,
                                          clock=self.clock, threads=threads,
                                          memory_budget_mb=memory_budget_mb,
                                          checkpoint_every=10 ** 9, log=log)
        self.runner, self.m = self.trainer.runner, self.trainer.m
        if self.m.lora is None:
            raise MobiletuneError(f"{bundle}: federated rounds exchange LoRA adapters; this "
                                  f"bundle fine-tunes every weight (export a LoRA recipe)")
        self.initial = {k: np.array(v) for k, v in self.runner.get_state().items()}
        self.expected = W.shapes(W.to_wire(self.initial))
        self.rank = int(self.m.lora["r"])
        self.scale = W.lora_scale(self.m.lora)

    # --- state across rounds ------------------------------------------------------------------
    def _fed_state(self) -> dict:
        p = self.out / FED_STATE
        return json.loads(p.read_text()) if p.exists() else {}

    def initial_adapter(self) -> dict:
        return W.to_wire(self.initial)

    def examples(self) -> int:
        return len(self.trainer.train)

    def _round_start(self, rnd: int) -> int:
        """Load the state this round starts from and return its step. The first time a
        round is seen, the current state (the newest checkpoint: the end of the previous
        round) is saved as the round's start; a round sent again (the server was restarted
        and re-runs it) rewinds to that saved start, so a resumed run is the same run."""
        t, starts = self.trainer, Checkpoints(self.out / "round-starts", keep=3, log=self.log)
        p = starts.path(rnd)
        if p.is_dir():
            state = st.load(p / "state.safetensors", mmap=False)
            meta = json.loads((p / "meta.json").read_text())
            self.runner.set_state(state)
            t.data = D.BatchIterator.from_state(t.train, min(self.m.variants), self.m.data["seed"],
                                                meta["data"], batch_size=self.m.effective_batch)
            t.step, self.clock.t = int(meta["train_step"]), float(meta["clock"])
            self.log(f"round {rnd}: rewound to its start (step {t.step})")
            return t.step
        start = t.resume()
        if start == 0:
            self.runner.set_state(self.initial)
        starts.save(rnd, self.runner.get_state(), {"data": t.data.state(), "train_step": start,
                                                   "clock": self.clock.now()})
        return start

    # --- one round ----------------------------------------------------------------------------
    def train_round(self, global_wire: dict | None, cfg: RoundConfig, rnd: int = 0,
                    bytes_down: int = 0, transfer=None, split=None) -> RoundResult:
        """Train ``cfg.steps`` steps from ``global_wire`` (None or empty: keep the local
        adapter, e.g. FlexLoRA's first round). ``transfer(nbytes, up) -> seconds`` is the
        profile's network model (None: free). ``split = (cut, link)``: SplitLoRA — the
        phone trains layers < cut and a server the rest through ``link``
        (``runtime.split.runner``); the adapter exchanged is the phone's layers' only, and
        the cut's activations and gradients count in the bytes and the link's time."""
        t, r = self.trainer, self.runner
        start = self._round_start(rnd)
        state = {k: np.array(v) for k, v in r.get_state().items()}
        if cfg.optimizer_state == "reset":
            state.update({k: self.initial[k].copy() for k in moment_leaves(state)})
        want = self.expected
        if cfg.frozen_a:
            want = {k: s for k, s in want.items() if k.endswith(W.B_SUFFIX)}
        split_runner = None
        if split is not None:
            from mobiletune.runtime.split.runner import SplitRunner

            def charge(up: int, down: int) -> None:
                if transfer:
                    self.clock.sleep(transfer(up, True) + transfer(down, False))
            split_runner = SplitRunner(r, split[0], split[1], on_exchange=charge)
            mine = {W.PREFIX + n for n in split_runner.names}
            want = {k: s for k, s in want.items() if k in mine}
        if global_wire:
            state.update(W.to_state_names(W.validate(global_wire, want, "global adapter")))
        r.set_state(state)
        if split_runner is not None:
            t.runner = split_runner
        anchor = {k: state[k].copy() for k in state if k.startswith(B.TRAINABLE)}
        down_s = transfer(bytes_down, False) if transfer else 0.0
        self.clock.sleep(down_s)
        t0_clock, t0_wall, rss = self.clock.now(), time.perf_counter(), []
        rows: list[dict] = []

        def after_step(tr, row):
            rows.append(row)
            rss.append(rss_mb())

        def should_stop(tr):
            if cfg.deadline_s is not None and self.clock.now() - t0_clock + down_s >= cfg.deadline_s:
                return "deadline"
            return None

        t.hooks = Hooks(before_apply=self._before_apply(cfg, anchor),
                        after_apply=self._after_apply(cfg, anchor),
                        after_step=after_step, should_stop=should_stop)
        try:
            run = t.run(start + cfg.steps)
        finally:
            t.hooks, t.runner = Hooks(), r
        events = [x for x in t.metrics.rows() if "event" in x and x["step"] >= start]
        done = run.step - start
        final = r.get_state()
        wire = {k: v for k, v in W.to_wire(final).items() if k in want}
        cut_up = split_runner.bytes_up if split_runner else 0
        cut_down = split_runner.bytes_down if split_runner else 0
        up_bytes = W.num_bytes(wire)
        up_s = transfer(up_bytes, True) if transfer else 0.0
        compute_phone = self.clock.now() - t0_clock
        self.clock.sleep(up_s)
        # energy: the battery's current × voltage where the trace (or the phone) reports them
        # on battery; the profile's power × the step's phone seconds for the other steps
        measured = sum(1 for x in rows if x.get("energy_j") is not None)
        energy = sum(x["energy_j"] if x.get("energy_j") is not None
                     else self.power_w * x["seconds"] * self.clock.speed for x in rows)
        atomic.write_text(self.out / FED_STATE, json.dumps({"clock": self.clock.now(),
                                                            "round": rnd}) + "\n")
        losses = [x["loss"] for x in rows]
        metrics = {
            "round": rnd, "steps": done, "train-loss": float(np.mean(losses)) if losses else math.nan,
            "step-time-s": float(np.mean([x["seconds"] for x in rows])) if rows else 0.0,
            "phone-step-time-s": compute_phone / done if done else 0.0,
            "compute-s": compute_phone, "download-s": down_s, "upload-s": up_s,
            "round-s": down_s + compute_phone + up_s,
            "bytes-down": int(bytes_down) + cut_down, "bytes-up": up_bytes + cut_up,
            "cut-bytes-up": cut_up, "cut-bytes-down": cut_down,
            "rss-avg-mb": float(np.mean(rss)) if rss else rss_mb(), "rss-peak-mb": peak_rss_mb(),
            "energy-j": float(energy), "energy-measured": measured,
            "paused": sum(1 for e in events if e["event"] == "pause"),
            "stopped": int(run.stopped_by is not None), "deadline-hit": int(run.stopped_by == "deadline"),
            "lora-rank": self.rank, "host-wall-s": time.perf_counter() - t0_wall,
        }
        if run.stopped_by and run.stopped_by != "deadline":
            self.log(f"round {rnd}: stopped by {run.stopped_by} after {done} of {cfg.steps} steps")
        return RoundResult(wire, done * self.m.effective_batch, metrics)

    def _before_apply(self, cfg: RoundConfig, anchor: dict):
        if not cfg.mu and not cfg.frozen_a:
            return None

        def hook(tr):
            s = self.runner.get_state()
            new = dict(s)
            n = np.float32(max(float(s[B.ACC_COUNT]), 1.0))
            for k in anchor:
                a = B.ACC + k[len(B.TRAINABLE):]
                if cfg.frozen_a and k.endswith(W.A_SUFFIX):
                    new[a] = np.zeros_like(s[a])
                elif cfg.mu:  # apply() divides by n: this adds mu * (w - w_global) to the gradient
                    new[a] = s[a] + np.float32(cfg.mu) * n * (s[k] - anchor[k])
            self.runner.set_state(new)
        return hook

    def _after_apply(self, cfg: RoundConfig, anchor: dict):
        if not cfg.frozen_a:
            return None

        def hook(tr):
            s = self.runner.get_state()
            new = dict(s)
            new.update({k: anchor[k] for k in anchor if k.endswith(W.A_SUFFIX)})
            self.runner.set_state(new)
        return hook

    def evaluate(self, wire: dict | None, dataset, batch: int | None = None) -> tuple[float, float]:
        """(summed NLL, tokens) of ``dataset`` under ``wire`` (None: the current adapter),
        the trainer's state left as it was."""
        from mobiletune.runtime.data import eval_batches
        keep = {k: np.array(v) for k, v in self.runner.get_state().items()}
        if wire:
            self.runner.set_state({**keep, **W.to_state_names(W.validate(wire, self.expected))})
        k = batch or max(self.m.variants)
        nll = count = 0.0
        try:
            for b in eval_batches(dataset, k):
                if len(b["inputs"]) != k:  # the last, smaller batch: pad with masked rows
                    b = pad_batch(b, k)
                n, c = self.runner.eval(b)
                nll, count = nll + n, count + c
        finally:
            self.runner.set_state(keep)
        return nll, count


def moment_leaves(state: dict) -> list[str]:
    """The optimizer's moment leaves (``.../mu/...``, ``.../nu/...``) and the step count that
    sits beside them (Adam's bias correction); not the schedule's count. Works for both the
    monolithic (optax tree paths) and the sharded (``opt/<group>/<leaf>``) names."""
    opt = [k for k in state if k.startswith(B.OPT)]
    parents = {k.split("/mu/")[0] for k in opt if "/mu/" in k} | \
              {k.split("/nu/")[0] for k in opt if "/nu/" in k}
    return [k for k in opt if "/mu/" in k or "/nu/" in k
            or (k.endswith("/count") and k[: -len("/count")] in parents)]


def pad_batch(b: dict, k: int) -> dict:
    n = len(b["inputs"])
    out = {}
    for key, v in b.items():
        pad = np.zeros((k - n,) + v.shape[1:], v.dtype)
        out[key] = np.concatenate([v, pad])
    return out


def eval_dataset(bundle, paths) -> "D.Dataset":
    """``paths`` prepared with the bundle's data config (no validation split)."""
    from dataclasses import replace

    from mobiletune.runtime.bundle import read_manifest
    from mobiletune.runtime.tokenizer import Tokenizer
    m = read_manifest(bundle)
    cfg = replace(D.DataConfig.from_dict(m.data), val_fraction=0.0)
    return D.prepare([Path(p) for p in paths], Tokenizer.from_dir(bundle), cfg).train
