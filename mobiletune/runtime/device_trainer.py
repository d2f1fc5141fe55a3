"""The device trainer: a bundle + on-device text in, trained adapters (or weights) out.

Each optimizer step makes up the bundle's effective batch from micro-batches of whatever
variant the energy scheduler picks (``accumulate_b{k}`` × effective/k, then ``apply``), so
the result does not depend on the battery's history: the data stream is fixed by the seed
(``runtime.data.BatchIterator``) and only how it is cut into micro-batches changes.

``DeviceTrainer`` is the loop with small parts the federated and side-tuning clients reuse:
``read``/``decide`` (a battery reading through the scheduler), ``hold`` (a pause until the
scheduler says run), ``optimizer_step`` (one step under a decision), ``checkpoint`` and
``write_outputs``; ``run(steps)`` strings them together. Hooks (``Hooks``) let a caller
act at fixed points without copying the loop: ``before_apply`` / ``after_apply`` around
each optimizer step (FedProx adds its proximal gradient to the accumulators there; FFA-LoRA
zeroes the frozen factors' gradients), ``after_step`` (a row of metrics) and
``should_stop`` (a round deadline); ``mobiletune.fed.local`` uses them. State (trainable params,
optimizer state, accumulators, step) is checkpointed every N steps, on pause, on
SIGTERM/SIGINT and at the end; ``resume()`` continues from the newest complete checkpoint.
Metrics go to ``metrics.jsonl``, one row per optimizer step (and one per pause / resume /
stop event); information lines go to stderr.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.runtime import bundle as B
from mobiletune.runtime import data as D
from mobiletune.runtime import peft_io
from mobiletune.runtime.energy import battery as battery_
from mobiletune.runtime.energy import scheduler as S
from mobiletune.runtime.energy.clocks import RealClock, SimClock
from mobiletune.runtime.energy.meter import EnergyMeter
from mobiletune.runtime.metrics import MetricsLog, peak_rss_mb
from mobiletune.runtime.progress import Progress
from mobiletune.runtime.runner import Runner, open_bundle
from mobiletune.runtime.state_checkpoints import Checkpoints
from mobiletune.runtime.tokenizer import Tokenizer


def info(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Hooks:
    """Callables of the trainer (``DeviceTrainer.hooks``); each may be None.
    ``before_apply(trainer)`` / ``after_apply(trainer)``: around ``runner.apply()``, with the
    step's gradients in the accumulators; ``after_step(trainer, row)``: after a step's
    metrics row is written; ``should_stop(trainer) -> str | None``: checked before each
    step, a reason ends the run (with a checkpoint) as a signal does."""
    before_apply: object = None
    after_apply: object = None
    after_step: object = None
    should_stop: object = None


@dataclass
class DeviceRun:
    step: int
    finished: bool
    stopped_by: str | None
    out: Path


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.caught = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        self.caught = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def prepare_data(runner, tok: Tokenizer, data_paths, log=info) -> D.Dataset:
    """The training examples the bundle's data config makes of ``data_paths``; refuses
    token ids outside the model's vocabulary and data smaller than one optimizer step."""
    m = runner.manifest
    prep = D.prepare([Path(p) for p in data_paths], tok, D.DataConfig.from_dict(m.data))
    for w in prep.warnings[:20]:
        log(f"data: {w}")
    vocab = int(m.model["vocab_size"])
    top = max((int(max(d.inputs.max(), d.targets.max())) for d in (prep.train, prep.val)
               if d is not None and len(d)), default=-1)
    if top >= vocab:
        raise MobiletuneError(f"data: token id {top} from the bundle's tokenizer is outside the "
                              f"model's vocabulary of {vocab} (tokenizer and model do not match)")
    if len(prep.train) < m.effective_batch:
        raise MobiletuneError(f"data: {len(prep.train)} examples, fewer than one optimizer step "
                              f"of {m.effective_batch}")
    return prep.train


def load_thresholds(path) -> S.Thresholds:
    """``--thresholds FILE``: a JSON object of ``Thresholds`` fields (the rest keep the
    bundle's values)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise MobiletuneError(f"--thresholds {p}: cannot read a JSON object ({e})") from None
    if not isinstance(d, dict):
        raise MobiletuneError(f"--thresholds {p}: expected a JSON object of threshold fields")
    return S.Thresholds.from_dict(d)


class DeviceTrainer:
    def __init__(self, runner: Runner, bundle, train: D.Dataset, out, *, battery: str = "auto",
                 thresholds: S.Thresholds | dict | None = None, checkpoint_every: int = 10,
                 poll_s: float = 60.0, clock=None, log=info):
        self.runner, self.m, self.train, self.out = runner, runner.manifest, train, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.bundle_hash = B.sha256_file(Path(bundle) / B.PROGRAM)
        self.log, self.poll_s, self.checkpoint_every = log, poll_s, checkpoint_every
        self.ckpts = Checkpoints(self.out / "checkpoints", log=log)
        th = {**self.m.thresholds, **(thresholds.to_dict() if isinstance(thresholds, S.Thresholds)
                                      else thresholds or {})}
        self.thresholds = S.Thresholds.from_dict(th)
        self.provider, described = battery_.open_provider(battery)
        self.clock = clock or (SimClock() if battery.startswith("trace:") else RealClock())
        self.meter = EnergyMeter()
        self.data = D.BatchIterator(train, min(self.m.variants), self.m.data["seed"],
                                    batch_size=self.m.effective_batch)
        self.step, self.decision, self.metrics = 0, None, None
        self._memory_told = False
        self.hooks = Hooks()
        log(f"battery: {described}")
        store = getattr(getattr(runner, "state", None), "store", None)    # sharded bundles
        if getattr(store, "streamed", False):
            log(f"state: streamed through {store.path} (unlinked; {store.total / 2**20:.1f} MB)")

    @classmethod
    def open(cls, bundle, data_paths, out, *, threads: int | None = None,
             memory_budget_mb: float | None = None, state_store: str = "auto",
             head: str = "program", **kw) -> "DeviceTrainer":
        """``state_store``: where a sharded bundle's trainable state lives (auto | ram |
        disk: a file under ``out``; ``runtime.sharded.state_store.choose``); ``head``: where
        a sharded bundle's steps run the head (program: LiteRT, default | host: numpy)."""
        runner = open_bundle(bundle, threads=threads, memory_budget_mb=memory_budget_mb,
                             state_dir=out, state_store=state_store, head=head)
        tok = Tokenizer.from_dir(bundle)
        return cls(runner, bundle, prepare_data(runner, tok, data_paths), out, **kw)

    # --- state ----------------------------------------------------------------------------
    def resume(self) -> int:
        """Continue from the newest complete checkpoint (returns its step; 0 if none)."""
        got = self.ckpts.newest(expected_names=[s.name for s in self.m.state])
        if got is not None:
            step, path, meta = got
            if meta.get("bundle") != self.bundle_hash:
                raise MobiletuneError(f"{self.out}: its checkpoints belong to another bundle")
            self.runner.load_state(path)
            self.data = D.BatchIterator.from_state(self.train, min(self.m.variants),
                                                   self.m.data["seed"], meta["data"],
                                                   batch_size=self.m.effective_batch)
            self.step = step
            if hasattr(self.runner, "set_memory_plan"):   # sharded: the same saved layers
                self.runner.set_memory_plan(meta.get("memory"))
            self.log(f"resumed from step {step}")
        return self.step

    def checkpoint(self) -> None:
        plan = getattr(self.runner, "memory_plan", lambda: None)()
        self.ckpts.save(self.step, self.runner.get_state(),
                        {"data": self.data.state(), "bundle": self.bundle_hash,
                         **({"memory": plan} if plan else {})},
                        after=self.runner.release)

    def write_outputs(self) -> None:
        """PEFT adapter (LoRA) or an HF-layout checkpoint (full FT), plus the full state."""
        write_outputs(self.runner, self.out)

    # --- the scheduler ----------------------------------------------------------------------
    def read(self) -> S.Reading:
        try:
            return self.provider.read(self.clock.now())
        except battery_.BatteryError as e:  # one failed reading is "unknown", not a crash
            self.log(f"battery: {e}")
            return S.Reading(time=self.clock.now())

    def decide(self, reading: S.Reading) -> S.Decision:
        self.decision = S.decide(reading, self.thresholds, tuple(self.m.variants), self.decision)
        return self.decision

    def event(self, kind: str, reading: S.Reading) -> None:
        self.metrics.write({"event": kind, "step": self.step, "time": self.clock.now(),
                            "reason": self.decision.reason, **reading_fields(reading)})

    def hold(self, reading: S.Reading, signals) -> str | None:
        """Checkpoint and wait out a pause (polling the battery); ``None`` once the
        scheduler says run again, else why the run stops."""
        self.checkpoint()
        self.event(self.decision.action, reading)
        if self.decision.action == "stop":
            return "battery"
        end = getattr(self.provider, "end_time", None)
        while self.decision.action == "pause":
            if signals.caught:
                return signals.caught
            if end is not None and self.clock.now() > end:
                return "the battery trace ended during a pause"
            self.clock.sleep(self.poll_s)
            reading = self.read()
            self.decide(reading)
        if self.decision.action == "stop":
            return self.hold(reading, signals)
        self.event("resume", reading)
        return None

    # --- one optimizer step -----------------------------------------------------------------
    def optimizer_step(self, reading: S.Reading) -> dict:
        """The effective batch in micro-batches of the decided variant, then ``apply``;
        the throttle sleeps between micro-steps. Returns the metrics row."""
        k, decision = self.decision.variant, self.decision
        t0 = time.perf_counter()
        tokens = slept = 0.0
        for _ in range(self.m.effective_batch // k):
            t_micro = time.perf_counter()
            b = self.data.next(k)
            self.runner.accumulate(b)
            tokens += float(b["loss_mask"].sum())
            pause = decision.sleep_after(time.perf_counter() - t_micro)
            if pause:
                self.clock.sleep(pause)  # the throttle: a duty cycle between micro-steps
                slept += pause
        if self.hooks.before_apply:
            self.hooks.before_apply(self)
        loss, _ = self.runner.apply()
        if not self._memory_told and getattr(self.runner, "memory_plan", lambda: None)():
            self._memory_told = True
            self.log(f"memory budget: {self.runner.describe_memory(k)}")
        if self.hooks.after_apply:
            self.hooks.after_apply(self)
        compute = time.perf_counter() - t0 - (0 if isinstance(self.clock, SimClock) else slept)
        self.clock.advance(compute)
        after = self.read()
        self.step += 1
        return {"step": self.step, "loss": loss, "tokens": tokens, "seconds": compute,
                "peak_rss_mb": round(peak_rss_mb(), 1), "variant": k, "sleep": slept,
                "reason": decision.reason, "energy_j": self.meter.step(reading, after),
                "time": self.clock.now(), **reading_fields(reading)}

    def progress(self, row: dict) -> dict:
        """What the progress bar shows after a step."""
        return {"loss": f"{row['loss']:.3f}", "k": row["variant"],
                "tok_s": f"{row['tokens'] / max(row['seconds'], 1e-9):.3g}"}

    # --- the loop -----------------------------------------------------------------------------
    def run(self, steps: int, stop_after: int | None = None) -> DeviceRun:
        """Train until ``steps`` optimizer steps are done (or a stop: battery, signal,
        ``stop_after`` steps taken in this call). Always ends with a checkpoint."""
        start, stopped_by = self.step, None
        self.metrics = MetricsLog(self.out / "metrics.jsonl", upto=start)
        with _Signals() as sig, Progress(total=steps - start, unit="step", desc="device") as bar:
            while self.step < steps:
                if sig.caught or (stop_after is not None and self.step - start >= stop_after):
                    stopped_by = sig.caught or "stop_after"
                    break
                if self.hooks.should_stop and (why := self.hooks.should_stop(self)):
                    stopped_by = why
                    break
                reading = self.read()
                if self.decide(reading).action != "run":
                    stopped_by = self.hold(reading, sig)
                    if stopped_by:
                        break
                    continue
                row = self.optimizer_step(reading)
                self.metrics.write(row)
                if self.hooks.after_step:
                    self.hooks.after_step(self, row)
                bar.update(1, **self.progress(row))
                if self.step % self.checkpoint_every == 0:
                    self.checkpoint()
        self.checkpoint()
        finished = self.step >= steps
        if finished:
            self.write_outputs()
        return DeviceRun(self.step, finished, stopped_by, self.out)


def reading_fields(r) -> dict:
    return {"battery": r.level, "charging": r.charging, "temperature": r.temperature_c}


def device_train(bundle, data_paths, out, steps: int | None = None, battery: str = "auto",
                 threads: int | None = None, resume: bool = False, checkpoint_every: int = 10,
                 thresholds=None, poll_s: float = 60.0, stop_after: int | None = None,
                 clock=None, memory_budget_mb: float | None = None,
                 state_store: str = "auto", head: str = "program") -> DeviceRun:
    """Train a bundle on local data (``mobiletune device train``; same defaults).
    ``battery``: auto | sysfs | termux | trace:FILE | none; a trace is replayed on a
    simulated clock (``clock``, default ``SimClock``) advanced by each step's measured
    compute time and the throttle's sleeps, so nothing waits. ``thresholds`` override the
    bundle's (a ``Thresholds`` or a dict of its fields). ``state_store``: auto | ram | disk,
    where a sharded bundle's trainable state lives (``runtime.sharded.state_store``)."""
    out = Path(out)
    t = DeviceTrainer.open(bundle, data_paths, out, threads=threads,
                           memory_budget_mb=memory_budget_mb, state_store=state_store,
                           head=head, battery=battery,
                           thresholds=thresholds, checkpoint_every=checkpoint_every,
                           poll_s=poll_s, clock=clock)
    if resume:
        t.resume()
    elif t.ckpts.newest() is not None:
        raise MobiletuneError(f"{out}: has checkpoints from an earlier run; pass --resume")
    return t.run(steps or t.m.steps, stop_after=stop_after)


def write_outputs(runner, out: Path) -> None:
    """PEFT adapter (LoRA) or an HF-layout checkpoint (full FT), plus the full state."""
    m = runner.manifest
    state = runner.get_state()
    st.save(out / B.STATE, state, after=runner.release)
    trainable = B.trainable_part(state)
    if m.lora is not None:
        peft_io.write_adapter(out / "adapter", trainable, m.lora, m.model["family"],
                              base_model=m.base_model)
    else:
        st.save(out / "model" / "model.safetensors", trainable, meta={"format": "pt"},
                after=runner.release)
        atomic.write_text(out / "model" / "config.json", json.dumps(m.hf_config, indent=2) + "\n")


def device_generate(bundle, prompt: str, state_dir=None, max_new_tokens: int = 48,
                    threads: int | None = None, chat: bool = False, temperature: float = 0.0,
                    seed: int = 0, side_weights=None, cache: bool = True) -> tuple[str, float]:
    """Greedy at temperature 0, else sampled (as ``mobiletune generate``). With ``cache``
    (the default) one ``prefill`` over the prompt, then one ``decode`` per new token over the
    host-held KV cache; without it (and for side-tuning bundles, whose side network has no
    cache: ``side_weights``) ``infer`` recomputes the whole prefix for every token. Both
    give the same tokens. Returns (text, tokens/s including the prefill)."""
    from mobiletune.runtime.sampling import prompt_ids
    state = None
    if state_dir is not None:
        state = st.load(Path(state_dir) / B.STATE, mmap=False)
    runner = open_bundle(bundle, threads=threads, state=state)
    if side_weights is not None:
        from mobiletune.runtime.side.infer import SideInfer, load_side_weights
        runner = SideInfer(runner, load_side_weights(side_weights, runner.manifest))
        cache = False
    tok = Tokenizer.from_dir(bundle)
    ids, stops = prompt_ids(tok, prompt, chat)
    t_max = runner.manifest.seq_len
    if len(ids) >= t_max:
        raise MobiletuneError(f"--prompt: {len(ids)} tokens; the bundle's window is {t_max}")
    new, dt = generate_ids(runner, ids, max_new_tokens, temperature, seed, stops, cache)
    return tok.decode(new), len(new) / max(dt, 1e-9)


def generate_ids(runner, ids, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 stops=(), cache: bool = True) -> tuple[list[int], float]:
    """(new token ids after ``ids``, seconds): the generation loop of ``device_generate``
    (stops before a stop token, at ``max_new_tokens`` or at the end of the window)."""
    from mobiletune.runtime.sampling import sample
    ids, t_max = list(ids), runner.manifest.seq_len
    rng = np.random.default_rng(seed)
    new = []
    t0 = time.perf_counter()
    if cache:
        logits, kv = runner.prefill(ids)
    while len(new) < max_new_tokens and len(ids) < t_max:
        if not cache:
            logits = runner.infer(ids, len(ids) - 1)
        nxt = sample(logits, temperature, rng)
        if nxt in stops:
            break
        ids.append(nxt)
        new.append(nxt)
        if cache and len(new) < max_new_tokens and len(ids) < t_max:
            logits = runner.decode(nxt, len(ids) - 1, kv)
    return new, time.perf_counter() - t0
