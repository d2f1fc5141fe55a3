"""The desktop trainer: a recipe in, adapters / a checkpoint, metrics and a loss curve out.

Each optimizer step runs ``accumulation`` micro-batches through the jitted ``accumulate``
and one ``apply`` (``mobiletune.train.step``): the same functions the exporter traces for the
phone. With one micro-batch per step it runs ``train_step``, which is those two compiled as
one program: the gradients feed the optimizer without a zeroed accumulator in between
(the same numbers; less memory, and faster).

Everything a step depends on is part of the saved state — trainable params,
optimizer state, step count, the data position — and the dropout key is derived from
(seed, step, micro-batch), so an interrupted run resumed with ``--resume`` takes exactly
the steps an uninterrupted run takes.

Output directory:
  recipe.json      the resolved recipe       metrics.jsonl  one JSON object per step
  loss.png         train/validation loss     checkpoints/   orbax, last 2 kept
  adapter/         PEFT adapter (LoRA)       merged/ or model/  HF checkpoint
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mobiletune import assets
from mobiletune.errors import MobiletuneError
from mobiletune.formats.loading import LoadedModel, load_model
from mobiletune.io.atomic import write_text as write_text_atomic
from mobiletune.models import lora
from mobiletune.runtime import data as D
from mobiletune.runtime.metrics import MetricsLog, peak_rss_mb
from mobiletune.runtime.progress import Progress
from mobiletune.train.optim import schedule
from mobiletune.train.recipe import Recipe
from mobiletune.train.setup import build_steps
from mobiletune.train.step import Steps, step_key


def resolve_data(specs) -> list[Path]:
    """Files for data specs: paths, or text assets (``shakespeare:macbeth``, ``botchan``,
    ``shakespeare:all`` = every play), or ``wordnet:define`` (JSONL built from WordNet)."""
    out = []
    for s in specs:
        p = Path(s).expanduser()
        if s == "wordnet:define":
            from mobiletune.assets.wordnet import build_jsonl
            p = build_jsonl()
        elif not p.exists():
            if not (":" in s or s in assets.TEXT_ASSETS):
                raise MobiletuneError(f"data {s!r}: no such file, and not a text asset")
            p = Path(assets.text_path(s))
        out.extend(sorted(p.glob("*_gut.txt")) if p.is_dir() else [p])
    return out


@dataclass
class Run:
    """What a training run is working on (built once, shared by loop and hooks)."""
    recipe: Recipe
    model: LoadedModel
    train: D.Dataset
    val: D.Dataset | None
    steps: Steps
    frozen: dict
    out: Path
    lr: object               # the optax schedule: step -> learning rate


def prepare_run(recipe: Recipe, out: Path) -> tuple[Run, dict]:
    """(run, initial trainable params)."""
    m = load_model(recipe.model, seed=recipe.seed)
    if recipe.seq_len > m.cfg.max_position - 1:
        raise MobiletuneError(f"seq_len={recipe.seq_len}: the model has {m.cfg.max_position} positions")
    dcfg = recipe.data_config()
    prep = D.prepare(resolve_data(recipe.data), m.tokenizer, dcfg,
                     val_paths=resolve_data(recipe.val_data) if recipe.val_data else None)
    for w in prep.warnings[:20]:
        print(f"data: {w}", file=sys.stderr)
    if len(prep.train) < recipe.batch_size:
        raise MobiletuneError(f"data: {len(prep.train)} training examples of {recipe.seq_len + 1} "
                              f"tokens, fewer than one batch of {recipe.batch_size}")
    steps, trainable, frozen = build_steps(recipe, m)
    return (Run(recipe, m, prep.train, prep.val, steps, frozen, out,
                schedule(recipe.optim_config())), trainable)


def on_device(batch: dict) -> dict:
    """A batch of numpy arrays as JAX arrays."""
    return {k: jnp.asarray(v) for k, v in batch.items()}


def evaluate(run: Run, fns, trainable) -> float | None:
    if run.val is None or len(run.val) == 0:
        return None
    nll = count = 0.0
    for i, b in enumerate(D.eval_batches(run.val, run.recipe.micro_batch)):
        if i >= run.recipe.eval_batches:
            break
        n, c = fns.eval_nll(trainable, run.frozen, on_device(b))
        nll, count = nll + float(n), count + float(c)
    return nll / max(count, 1.0)


def train(recipe: Recipe, out_dir, resume: bool = False) -> dict:
    """Run (or resume) a recipe; returns a summary."""
    from mobiletune.train import orbax_checkpoints as ckpt
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise MobiletuneError(f"{out}: has checkpoints from an earlier run; pass --resume to "
                              f"continue it or choose another --out")
    run, trainable = prepare_run(recipe, out)
    r, fns = recipe, run.steps.jitted()
    state = run.steps.init(trainable)
    it = D.BatchIterator(run.train, r.micro_batch, r.seed, batch_size=r.batch_size)
    manager = ckpt.Manager(out / "checkpoints")
    if resume and manager.latest_step() is not None:
        state, it_state, saved_fp = manager.restore(state)
        if saved_fp != r.fingerprint():
            raise MobiletuneError(f"{out}: the checkpoint was made by a different recipe "
                                  f"(fingerprint {saved_fp} != {r.fingerprint()})")
        it = D.BatchIterator.from_state(run.train, r.micro_batch, r.seed, it_state,
                                        batch_size=r.batch_size)
        print(f"resumed from step {int(state.step)}", file=sys.stderr)
    write_text_atomic(out / "recipe.json", json.dumps(r.to_dict(), indent=2) + "\n")
    log = MetricsLog(out / "metrics.jsonl", upto=int(state.step))
    start = int(state.step)
    if start == 0:
        v = evaluate(run, fns, state.trainable)
        if v is not None:
            log.write({"step": 0, "val_loss": v, "val_ppl": math.exp(v)})
            print(f"step 0: val_loss={v:.4f} val_ppl={math.exp(v):.2f}", file=sys.stderr)
    tokens_per_step = r.batch_size * r.seq_len
    t_run = time.perf_counter()
    with Progress(total=r.steps - start, unit="step", desc="train") as bar:
        for step in range(start, r.steps):
            t0 = time.perf_counter()
            if r.accumulation == 1:
                b = it.next()
                tokens = float(b["loss_mask"].sum())
                state, loss = fns.train_step(state, run.frozen, on_device(b),
                                             step_key(r.seed, step, 0))
            else:
                acc, tokens = run.steps.zero_accum(state.trainable), 0.0
                for micro in range(r.accumulation):
                    b = it.next()
                    acc = fns.accumulate(acc, state.trainable, run.frozen, on_device(b),
                                         step_key(r.seed, step, micro))
                    tokens += float(b["loss_mask"].sum())
                state, loss = fns.apply(state, acc)
            loss = float(loss)
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise MobiletuneError(f"step {step + 1}: loss is {loss}; lower optim.lr?")
            row = {"step": step + 1, "loss": loss, "lr": float(run.lr(step)),
                   "tokens": tokens, "seconds": dt, "peak_rss_mb": round(peak_rss_mb(), 1)}
            done = step + 1
            if (r.eval_every and done % r.eval_every == 0) or done == r.steps:
                v = evaluate(run, fns, state.trainable)
                if v is not None:
                    row.update(val_loss=v, val_ppl=math.exp(v))
            log.write(row)
            bar.update(1, loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                       peak_mb=f"{row['peak_rss_mb']:.0f}")
            if done % r.checkpoint_every == 0 or done == r.steps:
                manager.save(done, state, it.state(), r.fingerprint())
    manager.close()
    return finish(run, state, log, time.perf_counter() - t_run)


def finish(run: Run, state, log: "MetricsLog", seconds: float) -> dict:
    from mobiletune.formats.hf import save_hf_dir
    from mobiletune.formats.peft import save_adapter
    from mobiletune.train.plot import plot_losses
    r, out, cfg = run.recipe, run.out, run.model.cfg
    trainable = {k: np.asarray(v) for k, v in state.trainable.items()}
    if r.lora is not None:
        save_adapter(out / "adapter", trainable, cfg, r.lora, base_model=r.model,
                     extra_meta={"recipe": r.fingerprint()})
        if r.save_merged:
            base = {k: np.asarray(v) for k, v in run.frozen.items()}
            save_hf_dir(out / "merged", cfg, lora.merge(base, trainable, cfg, r.lora.resolved(cfg)),
                        tokenizer=run.model.tokenizer)
    else:
        save_hf_dir(out / "model", cfg, trainable, tokenizer=run.model.tokenizer)
    plot_losses(out / "metrics.jsonl", out / "loss.png", title=r.name)
    rows = log.rows()
    last = rows[-1]
    summary = {"step": int(state.step), "finished": True, "loss": last.get("loss"),
               "val_loss": last.get("val_loss"), "val_ppl": last.get("val_ppl"),
               "first_val_ppl": next((x["val_ppl"] for x in rows if "val_ppl" in x), None),
               "seconds": seconds, "peak_rss_mb": peak_rss_mb()}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
