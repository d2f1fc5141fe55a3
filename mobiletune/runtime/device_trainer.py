"""The device trainer: a bundle + on-device text in, trained adapters (or weights) out.

Each optimizer step makes up the bundle's effective batch from micro-batches of whatever
variant the energy scheduler picks (``accumulate_b{k}`` × effective/k, then ``apply``), so
the result does not depend on the battery's history: the data stream is fixed by the seed
(``runtime.data.BatchIterator``) and only how it is cut into micro-batches changes.

State (trainable params, optimizer state, accumulators) is checkpointed through
``get_state`` every N steps, on pause, on SIGTERM/SIGINT and at the end; ``--resume``
continues from the newest complete checkpoint. Metrics go to ``metrics.jsonl``, one row per
optimizer step (and one per pause / resume / stop event).
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic
from mobiletune.io import safetensors as st
from mobiletune.runtime import data as D
from mobiletune.runtime import peft_io
from mobiletune.runtime.bundle import sha256_file
from mobiletune.runtime.energy import battery as B
from mobiletune.runtime.energy import scheduler as S
from mobiletune.runtime.litert import BundleRunner
from mobiletune.runtime.metrics import MetricsLog, peak_rss_mb
from mobiletune.runtime.progress import Progress
from mobiletune.runtime.state_checkpoints import Checkpoints
from mobiletune.runtime.tokenizer import Tokenizer


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


def prepare_data(runner: BundleRunner, tok: Tokenizer, data_paths) -> D.Dataset:
    m = runner.manifest
    dcfg = D.DataConfig.from_dict(m.data)
    prep = D.prepare([Path(p) for p in data_paths], tok, dcfg)
    for w in prep.warnings[:20]:
        print(f"data: {w}")
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


def device_train(bundle, data_paths, out, steps: int | None = None, battery: str = "none",
                 threads: int | None = None, resume: bool = False, checkpoint_every: int = 10,
                 thresholds: S.Thresholds | None = None, poll_s: float = 60.0,
                 stop_after: int | None = None, clock=None,
                 memory_budget_mb: float | None = None) -> DeviceRun:
    """Train a bundle on local data. ``battery``: auto | sysfs | termux | trace:FILE | none;
    a trace is replayed on a simulated clock (``clock``, default ``SimClock``) advanced by
    each step's measured compute time and the throttle's sleeps, so nothing waits."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(out / "checkpoints")
    runner = BundleRunner.open(bundle, threads=threads, memory_budget_mb=memory_budget_mb)
    m = runner.manifest
    bundle_hash = sha256_file(Path(bundle) / "program.tflite")
    tok = Tokenizer.from_dir(bundle)
    train = prepare_data(runner, tok, data_paths)
    steps = steps or m.recipe.get("steps") or 100
    seed = m.data["seed"]
    it = D.BatchIterator(train, min(m.variants), seed, batch_size=m.effective_batch)
    start = 0
    if resume:
        got = ckpts.latest(expected_names=[s.name for s in m.state])
        if got is not None:
            start, state, meta = got
            if meta.get("bundle") != bundle_hash:
                raise MobiletuneError(f"{out}: its checkpoints belong to another bundle")
            runner.set_state(state)
            it = D.BatchIterator.from_state(train, min(m.variants), seed, meta["data"],
                                            batch_size=m.effective_batch)
            print(f"resumed from step {start}")
    elif ckpts.latest() is not None:
        raise MobiletuneError(f"{out}: has checkpoints from an earlier run; pass --resume")
    provider, described = B.open_provider(battery)
    if clock is None:
        clock = B.SimClock() if battery.startswith("trace:") else B.RealClock()

    def read():
        try:
            return provider.read(clock.now())
        except B.BatteryError as e:  # one failed reading is "unknown", not a crash
            print(f"battery: {e}")
            return S.Reading(time=clock.now())
    print(f"battery: {described}")
    th = thresholds or S.Thresholds.from_dict(m.extra.get("thresholds", {}))
    log = MetricsLog(out / "metrics.jsonl", upto=start)
    meter = B.EnergyMeter()

    def checkpoint(step):
        ckpts.save(step, runner.get_state(), {"data": it.state(), "bundle": bundle_hash})

    decision, stopped_by = None, None
    step = start
    with _Signals() as sig, Progress(total=steps - start, unit="step", desc="device") as bar:
        while step < steps:
            if sig.caught or (stop_after is not None and step - start >= stop_after):
                stopped_by = sig.caught or "stop_after"
                break
            reading = read()
            decision = S.decide(reading, th, tuple(m.variants), decision)
            if decision.action != "run":
                checkpoint(step)
                log.write({"event": decision.action, "step": step, "time": clock.now(),
                           "reason": decision.reason, **_reading_fields(reading)})
                if decision.action == "stop":
                    stopped_by = "battery"
                    break
                end = getattr(provider, "end_time", None)
                while decision.action == "pause" and not sig.caught:
                    if end is not None and clock.now() > end:
                        stopped_by = "the battery trace ended during a pause"
                        break
                    clock.sleep(poll_s)
                    reading = read()
                    decision = S.decide(reading, th, tuple(m.variants), decision)
                if decision.action != "run":
                    if stopped_by or sig.caught:
                        break
                    continue
                log.write({"event": "resume", "step": step, "time": clock.now(),
                           "reason": decision.reason, **_reading_fields(reading)})
                continue
            k = decision.variant
            t0 = time.perf_counter()
            tokens = 0.0
            slept = 0.0
            for _ in range(m.effective_batch // k):
                t_micro = time.perf_counter()
                b = it.next(k)
                runner.accumulate(b)
                tokens += float(b["loss_mask"].sum())
                pause = decision.sleep_after(time.perf_counter() - t_micro)
                if pause:
                    clock.sleep(pause)  # the throttle: a duty cycle between micro-steps
                    slept += pause
            loss, n = runner.apply()
            compute = time.perf_counter() - t0 - (0 if isinstance(clock, B.SimClock) else slept)
            clock.advance(compute)
            after = read()
            step += 1
            log.write({"step": step, "loss": loss, "tokens": tokens, "seconds": compute,
                       "peak_rss_mb": round(peak_rss_mb(), 1),
                       "variant": k, "sleep": slept, "reason": decision.reason,
                       "energy_j": meter.step(reading, after), "time": clock.now(),
                       **_reading_fields(reading)})
            bar.update(1, loss=f"{loss:.3f}", k=k, tok_s=f"{tokens / compute:.0f}")
            if step % checkpoint_every == 0:
                checkpoint(step)
    checkpoint(step)
    finished = step >= steps
    if finished:
        write_outputs(runner, out)
    return DeviceRun(step, finished, stopped_by, out)


def _reading_fields(r) -> dict:
    return {"battery": r.level, "charging": r.charging, "temperature": r.temperature_c}


def write_outputs(runner: BundleRunner, out: Path) -> None:
    """PEFT adapter (LoRA) or an HF-layout checkpoint (full FT), plus the full state."""
    m = runner.manifest
    state = runner.get_state()
    st.save(out / "state.safetensors", state)
    trainable = {k[len("trainable/"):]: v for k, v in state.items() if k.startswith("trainable/")}
    if m.lora is not None:
        peft_io.write_adapter(out / "adapter", trainable, m.lora, m.model["family"],
                              base_model=m.extra.get("base_model"))
    else:
        st.save(out / "model" / "model.safetensors", trainable, meta={"format": "pt"})
        atomic.write_text(out / "model" / "config.json",
                             json.dumps(m.extra["hf_config"], indent=2) + "\n")


def device_generate(bundle, prompt: str, state_dir=None, max_new_tokens: int = 32,
                    threads: int | None = None) -> tuple[str, float]:
    """Greedy generation with ``infer`` (the prefix is recomputed for every token).
    Returns (text, tokens per second)."""
    state = None
    if state_dir is not None:
        state = st.load(Path(state_dir) / "state.safetensors", mmap=False)
    runner = BundleRunner.open(bundle, threads=threads, state=state)
    tok = Tokenizer.from_dir(bundle)
    ids = tok.encode(prompt, add_special_tokens=tok.adds_bos)
    t_max = runner.manifest.seq_len
    if len(ids) >= t_max:
        raise MobiletuneError(f"--prompt: {len(ids)} tokens; the bundle's window is {t_max}")
    new = []
    t0 = time.perf_counter()
    while len(new) < max_new_tokens and len(ids) < t_max:
        nxt = int(np.argmax(runner.infer(ids, len(ids) - 1)))
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
        new.append(nxt)
    dt = time.perf_counter() - t0
    return tok.decode(new), len(new) / max(dt, 1e-9)
