"""Sharded bundles: the chained per-block gradients against ``jax.grad`` of the whole model
(every family, LoRA and full fine-tuning), then exported LiteRT bundles trained by the
device trainer against the desktop trainer, and the weight store's failure modes."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from export.sharded_bundle import export_sharded  # noqa: E402
from mobiletune import models  # noqa: E402
from mobiletune.formats.hf import save_hf_dir  # noqa: E402
from mobiletune.formats.loading import load_model, preset_tokenizer  # noqa: E402
from mobiletune.io import safetensors as st  # noqa: E402
from mobiletune.models.config import ModelConfig  # noqa: E402
from mobiletune.models.lora import LoraConfig  # noqa: E402
from mobiletune.programs.sharded import JaxCalls, ShardedModel  # noqa: E402
from mobiletune.runtime import bundle as B  # noqa: E402
from mobiletune.runtime.bundle import read_manifest  # noqa: E402
from mobiletune.runtime.device_trainer import device_train  # noqa: E402
from mobiletune.runtime.sharded import ShardedRunner  # noqa: E402
from mobiletune.train.loss import batch_nll  # noqa: E402
from mobiletune.train.optim import OptimConfig  # noqa: E402
from mobiletune.train.recipe import Recipe  # noqa: E402
from mobiletune.train.setup import build_steps  # noqa: E402
from tests.helpers import (  # noqa: E402
    PhoneClock,
    draining_trace,
    kill_after_steps,
    losses,
    require_asset,  # noqa: E402
)
from tests.tiny import TINY_HF, tiny_dir_with_gpt2_tokenizer  # noqa: E402

SEQ = 12
FAMILIES = ("gpt2", "qwen2-untied", "qwen2-tied", "llama", "gemma3")


def tiny_recipe(model, mode, **kw):
    return Recipe(name="t", model=str(model), data=("unused",), seq_len=SEQ, micro_batch=2,
                  steps=100, lora=LoraConfig(r=4, alpha=8, target_modules="all-linear")
                  if mode == "lora" else None,
                  optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant",
                                    weight_decay=0.01), **kw)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("saved", [False, True], ids=["recompute", "saved-host-head"])
def test_chained_gradient_equals_jax_grad(tmp_path, family, mode, saved):
    """The runtime's host chain (embedding gather, per-layer fwd/bwd, vocabulary chunks
    merged online) run over the JAX signature functions: summed-NLL gradients equal
    ``jax.grad`` of the whole model within 1e-5 relative (per tensor, to its max |g|).
    ``saved``: a memory budget with room for every layer's residuals, so the second
    micro-batch runs block_fwd_save / block_bwd_saved (no recompute) instead, and the head
    (with a tied head in full fine-tuning, its weight gradient too) in numpy (head="host")."""
    cfg = ModelConfig.from_hf_config(TINY_HF[family])
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    params = {k: v + 0.1 * jax.random.normal(jax.random.PRNGKey(len(k)), v.shape)
              if ("norm" in k or "ln_" in k) else v for k, v in params.items()}
    save_hf_dir(tmp_path / "m", cfg, {k: np.asarray(v) for k, v in params.items()},
                tokenizer=preset_tokenizer("gpt2"))
    r = tiny_recipe(tmp_path / "m", mode)
    export_sharded(r, tmp_path / "b", (2,), program=False, vocab_chunk=40)  # 3 chunks
    m = read_manifest(tmp_path / "b")
    steps, tr, fr = build_steps(r, load_model(r.model, seed=r.seed))
    sm = ShardedModel(cfg, steps.lcfg, r.optim, {k: v.shape for k, v in tr.items()},
                      {k: v.shape for k, v in fr.items()}, SEQ, vocab_chunk=40)
    run = ShardedRunner(tmp_path / "b", m, JaxCalls(sm, (2,)),
                        memory_budget_mb=1e6 if saved else None,
                        head="host" if saved else "program")
    run.set_state(st.load(tmp_path / "b" / "state.safetensors"), zeros_for_missing=True)
    rng = np.random.default_rng(1)
    batch = {"inputs": rng.integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32),
             "targets": rng.integers(0, cfg.vocab_size, (2, SEQ)).astype(np.int32),
             "loss_mask": (rng.random((2, SEQ)) > 0.3).astype(np.float32)}
    if saved:   # the first micro-batch measures the room; the second saves every layer
        run.accumulate(batch)
        assert run.saved_layers(2) == cfg.num_layers and run.residual_bytes(2) > 0
        for g in run.grad.values():
            g[...] = 0
    nll, count = run.accumulate(batch)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    lora = steps.lcfg.ctx() if steps.lcfg else None
    ref, grads = jax.value_and_grad(lambda t: batch_nll({**fr, **t}, cfg, jb, lora)[0])(tr)
    assert abs(nll - float(ref)) <= 1e-5 * abs(float(ref))
    assert count == batch["loss_mask"].sum()
    assert set(grads) == set(run.grad)
    for k, g in grads.items():
        g = np.asarray(g)
        scale = max(np.abs(g).max(), 1e-12)
        assert np.abs(run.grad[k] - g).max() / scale <= 1e-5, k


def head_case(softcap):
    """A tiny Gemma 3 head chunk of 40 rows, 27 real (13 padding), soft-capped or not, and
    targets mostly outside it: (ShardedModel, hn, w, col_valid, labels, n, rng)."""
    cfg = ModelConfig.from_hf_config(TINY_HF["gemma3"]).replace(final_logit_softcapping=softcap)
    d, vc, n = cfg.hidden_size, 40, 27
    sm = ShardedModel(cfg, None, OptimConfig(), {}, models.param_shapes(cfg), SEQ, vocab_chunk=vc)
    rng = np.random.default_rng(0)
    hn = rng.standard_normal((2, SEQ, d)).astype(np.float32)
    w = np.zeros((vc, d), np.float32)
    w[:n] = rng.standard_normal((n, d)).astype(np.float32) * 0.5
    valid = (np.arange(vc) < n).astype(np.float32)
    labels = rng.integers(-30, 60, (2, SEQ)).astype(np.int32)    # some in [0, n), most not
    return sm, hn, w, valid, labels, n, rng


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_host_head_chunk_equals_the_head_fwd_signature(softcap):
    """``runtime.sharded.head.head_chunk`` (numpy, ``--head host``) against the
    bundle's ``head_fwd`` (JAX): a padded last chunk, targets inside and outside the chunk,
    with and without soft-capping; within 1e-5 relative per output."""
    from mobiletune.runtime.sharded.head import head_chunk
    sm, hn, w, valid, labels, n, rng = head_case(softcap)
    ref = jax.jit(sm.head_fwd)(hn, w, valid, labels)
    got = head_chunk(hn, w[:n], labels, softcap)
    assert set(got) == set(ref)
    for k, v in ref.items():
        v = np.asarray(v)
        assert got[k].dtype == np.float32 and got[k].shape == v.shape, k
        assert np.abs(got[k] - v).max() <= 1e-5 * max(np.abs(v).max(), 1e-6), k


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_host_head_wgrad_equals_the_head_wgrad_signature(softcap):
    """``head.head_wgrad_chunk`` (numpy, ``--head host`` with a trained head) against the
    bundle's ``head_wgrad`` (JAX) on the real rows of a padded chunk, targets inside and
    outside it, a ragged loss mask; within 1e-5 relative to the largest |g|."""
    from mobiletune.runtime.sharded.head import head_wgrad_chunk
    sm, hn, w, valid, labels, n, rng = head_case(softcap)
    lse = rng.standard_normal((2, SEQ)).astype(np.float32) + 6   # another chunk's share too
    mask = (rng.random((2, SEQ)) > 0.3).astype(np.float32)
    ref = np.asarray(jax.jit(sm.head_wgrad)(hn, w, valid, labels, lse, mask))[:n]
    got = head_wgrad_chunk(hn, w[:n], labels, lse, mask, softcap)
    assert got.dtype == np.float32 and got.shape == (n, hn.shape[-1])
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


CASES = {  # name: (family, LoRA, accumulation, clip, variants, head)
    "gpt2-lora": ("gpt2", LoraConfig(r=4, alpha=8, target_modules=("c_attn", "c_fc")), 1, 1.0,
                  (1, 2, 4), "host"),
    "gemma3-full": ("gemma3", None, 2, 0.5, (2, 4), "program"),   # the head in LiteRT (default)
}


@pytest.fixture(scope="session")
def sharded_runs(tmp_path_factory):
    """name -> (root, recipe, bundle, device output): exported and trained once."""
    from mobiletune import assets
    root = tmp_path_factory.mktemp("sharded")
    data = root / "data.txt"
    data.write_text(assets.read_text("botchan")[:20000], encoding="utf-8")
    cache = {}

    def get(name):
        if name not in cache:
            family, lora, acc, clip, variants, head = CASES[name]
            d = root / name
            model = tiny_dir_with_gpt2_tokenizer(d / "model", family)
            recipe = Recipe(name="sharded", model=str(model), data=(str(data),), seq_len=24,
                            micro_batch=4, accumulation=acc, steps=10, val_fraction=0.1,
                            lora=lora, optim=OptimConfig(lr=5e-3, warmup_steps=2,
                                                         weight_decay=0.01, clip_norm=clip),
                            eval_every=0, checkpoint_every=5)
            export_sharded(recipe, d / "bundle", variants)
            run = device_train(d / "bundle", [data], d / "device", battery="none", head=head)
            assert run.finished and run.step == 10
            cache[name] = (d, recipe, d / "bundle", d / "device")
        return cache[name]
    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_sharded_device_tracks_desktop(sharded_runs, name):
    """10 optimizer steps of the LiteRT sharded bundle on the device trainer vs the desktop
    JAX trainer on the same recipe, data and seed: losses within 1e-4 every step."""
    from mobiletune.train.trainer import train
    d, recipe, _, dev = sharded_runs(name)
    train(recipe, d / "desktop")
    ld, lp = losses(d / "desktop"), losses(dev)
    assert len(ld) == len(lp) == 10
    assert max(abs(a - b) for a, b in zip(ld, lp)) <= 1e-4, (ld, lp)
    if recipe.lora is not None:
        a = st.load(d / "desktop" / "adapter" / "adapter_model.safetensors")
        b = st.load(dev / "adapter" / "adapter_model.safetensors")
    else:
        a = st.load(d / "desktop" / "model" / "model.safetensors")
        b = st.load(dev / "model" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-4, err_msg=k)


def test_variants_switch_pause_and_resume_end_equal(sharded_runs, tmp_path):
    """A draining battery trace switches micro-batch variants (4, 2, 1) and pauses; then a
    run stopped after 3 steps and resumed from its checkpoint: both end where the
    unconstrained run did (the same data, cut differently into micro-batches)."""
    d, _, bundle, dev = sharded_runs("gpt2-lora")
    data = d.parent / "data.txt"
    trace = draining_trace(tmp_path / "trace.csv")
    out = tmp_path / "battery"
    r = device_train(bundle, [data], out, battery=f"trace:{trace}", clock=PhoneClock())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert r.finished
    assert len({x["variant"] for x in rows if "variant" in x}) == 3
    assert "pause" in [x.get("event") for x in rows]
    part = tmp_path / "resumed"
    assert not device_train(bundle, [data], part, battery="none", stop_after=3).finished
    assert device_train(bundle, [data], part, battery="none", resume=True).finished
    a = st.load(dev / "adapter" / "adapter_model.safetensors")
    for o in (out, part):
        b = st.load(o / "adapter" / "adapter_model.safetensors")
        for k in a:
            np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)


def test_float16_store_halves_the_bundle(tmp_path, sharded_runs):
    d, recipe, bundle, _ = sharded_runs("gpt2-lora")
    export_sharded(dataclasses.replace(recipe), tmp_path / "b16", (4,), store_dtype="float16",
                   verify=False)
    w32 = (bundle / B.WEIGHTS).stat().st_size
    w16 = (tmp_path / "b16" / B.WEIGHTS).stat().st_size
    assert 0.49 < w16 / w32 < 0.51
    m = read_manifest(tmp_path / "b16")
    assert m.sharded.store_dtype == "float16"


def test_int8_store_quarters_the_bundle_and_infers_with_its_own_weights(tmp_path, sharded_runs):
    """``--store-dtype int8``: one scale per output channel (rows of the embedding, columns
    of GPT-2's Conv1D weights); the store hands back exactly ``q * scale``, within half a
    step of the float32 weight; ``infer`` on the int8 bundle equals ``models.forward`` on
    those weights (1e-4) with the trained adapter."""
    from mobiletune.formats.peft import load_adapter
    from mobiletune.runtime.runner import open_bundle
    from mobiletune.runtime.sharded import int8
    from mobiletune.runtime.sharded.weights import WeightStore
    d, recipe, bundle, dev = sharded_runs("gpt2-lora")
    export_sharded(recipe, tmp_path / "b8", (1,), store_dtype="int8")
    assert read_manifest(tmp_path / "b8").sharded.store_dtype == "int8"
    w32, w8 = (bundle / B.WEIGHTS).stat().st_size, (tmp_path / "b8" / B.WEIGHTS).stat().st_size
    assert w8 / w32 < 0.3, w8 / w32  # 1/4 + the scales and the float32 norms and biases
    m = load_model(recipe.model)
    store = WeightStore(tmp_path / "b8" / B.WEIGHTS)
    assert store.scales["transformer.h.0.attn.c_attn.weight"].shape == (1, m.cfg.hidden_size * 3)  # Conv1D
    assert store.scales["transformer.wte.weight"].shape == (m.cfg.vocab_size, 1)
    seen = int8.roundtrip(m.params, "gpt2")
    for name in store.entries:
        got, w = store.get(name), np.asarray(m.params[name])
        np.testing.assert_array_equal(got, seen[name], err_msg=name)
        if name in store.scales:
            assert (np.abs(got - w) <= store.scales[name] * (0.5 + 1e-4)).all(), name  # + float32 rounding
            assert np.abs(got - w).max() > 0, name
    rows = [5, 0, 5, 77]
    np.testing.assert_array_equal(store.gather_rows("transformer.wte.weight", rows), seen["transformer.wte.weight"][rows])
    r = open_bundle(tmp_path / "b8", state=st.load(dev / "state.safetensors", mmap=False))
    tokens = [464, 3290, 318, 257, 1332, 286]
    lcfg, lora_params = load_adapter(dev / "adapter", m.cfg)
    params = {**{k: jnp.asarray(v) for k, v in seen.items()}, **lora_params}
    ref, _ = models.forward(params, m.cfg, jnp.asarray([tokens], jnp.int32), lora=lcfg.ctx())
    np.testing.assert_allclose(r.infer(tokens, len(tokens) - 1), np.asarray(ref[0, -1]), atol=1e-4)


def test_int8_store_without_its_scales_is_refused_by_name(tmp_path):
    from mobiletune.runtime.bundle import BundleError
    from mobiletune.runtime.sharded.weights import WeightStore
    q = np.ones((3, 4), np.int8)
    st.save(tmp_path / "w.safetensors", {"a.weight": q})
    with pytest.raises(BundleError, match="'a.weight:scale'.*found none"):
        WeightStore(tmp_path / "w.safetensors")
    st.save(tmp_path / "w.safetensors", {"a.weight": q, "a.weight:scale": np.ones((4, 1), np.float32)})
    with pytest.raises(BundleError, match=r"of shape \(3, 1\) or \(1, 4\); found float32 \(4, 1\)"):
        WeightStore(tmp_path / "w.safetensors")


def test_memory_budget_saves_residuals_caches_weights_and_changes_nothing(sharded_runs,
                                                                        tmp_path):
    """With a budget the runner saves the last layers' residuals in the forward pass
    (block_fwd_save; the backward pass, block_bwd_saved, does not recompute the block's
    matmuls) and keeps widened layer weights between the passes (an LRU cache): the
    trained adapter equals the recomputing run's within 1e-6."""
    from mobiletune.runtime.metrics import peak_rss_mb
    from mobiletune.runtime.runner import open_bundle
    d, _, bundle, dev = sharded_runs("gpt2-lora")
    out = tmp_path / "budget"
    budget = peak_rss_mb() + 1024  # this test process is large (pytest, JAX, TF): 1 GB headroom
    assert device_train(bundle, [d.parent / "data.txt"], out, battery="none",
                        memory_budget_mb=budget, head="host").finished
    a = st.load(dev / "adapter" / "adapter_model.safetensors")
    b = st.load(out / "adapter" / "adapter_model.safetensors")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    r = open_bundle(bundle, memory_budget_mb=budget)
    z = np.zeros((4, 24), np.int32)
    r.accumulate({"inputs": z, "targets": z, "loss_mask": np.ones((4, 24), np.float32)})
    r.accumulate({"inputs": z, "targets": z, "loss_mask": np.ones((4, 24), np.float32)})
    assert r.cache.bytes > 0, "nothing was cached under a generous budget"
    assert r.saved_layers(4) == 2 and r.residual_bytes(4) > 0


def test_damaged_weight_store_is_refused_by_name(sharded_runs, tmp_path):
    import shutil

    from mobiletune.runtime.bundle import BundleError
    from mobiletune.runtime.runner import open_bundle
    _, _, bundle, _ = sharded_runs("gpt2-lora")
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    p = bad / B.WEIGHTS
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(BundleError, match="weights.safetensors"):
        open_bundle(bad)
    with pytest.raises(BundleError, match="weights.safetensors.*truncated"):
        open_bundle(bad, verify=False)


def test_sharded_infer_equals_the_jax_forward(sharded_runs):
    """``infer`` (block chain with micro-batch 1, head on the host) gives the model's
    next-token logits: within 1e-4 of ``models.forward`` on the trained adapter."""
    from mobiletune.formats.peft import load_adapter
    from mobiletune.runtime.runner import open_bundle
    d, recipe, bundle, dev = sharded_runs("gpt2-lora")
    m = load_model(recipe.model)
    r = open_bundle(bundle, state=st.load(dev / "state.safetensors", mmap=False))
    tokens = [464, 3290, 318, 257, 1332, 286]
    got = r.infer(tokens, len(tokens) - 1)
    lcfg, lora_params = load_adapter(dev / "adapter", m.cfg)
    params = {**{k: jnp.asarray(v) for k, v in m.params.items()}, **lora_params}
    ref, _ = models.forward(params, m.cfg, jnp.asarray([tokens], jnp.int32), lora=lcfg.ctx())
    np.testing.assert_allclose(got, np.asarray(ref[0, -1]), atol=1e-4)


@pytest.mark.slow
def test_real_smollm2_sharded_step_equals_desktop(tmp_path):
    """Real weights: a sharded SmolLM2-135M bundle's first micro-batch NLL and LoRA
    gradients (LiteRT chain) against the desktop JAX step on the same batch."""
    from mobiletune import assets
    from mobiletune.runtime.runner import open_bundle
    require_asset(assets.model_path, "smollm2-135m")
    r = Recipe(name="real", model="smollm2-135m", data=("unused",), seq_len=64, micro_batch=2,
               steps=10, lora=LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
               optim=OptimConfig(lr=1e-3, warmup_steps=0))
    export_sharded(r, tmp_path / "b", (2,), verify=False)
    run = open_bundle(tmp_path / "b")
    m = load_model(r.model, seed=r.seed)
    ids = np.asarray(m.tokenizer.encode("To be, or not to be, that is the question: " * 12)
                     [: 2 * 65], np.int32).reshape(2, 65)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
             "loss_mask": np.ones((2, 64), np.float32)}
    nll, count = run.accumulate(batch)
    steps, tr, fr = build_steps(r, m)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    ref, grads = jax.value_and_grad(
        lambda t: batch_nll({**fr, **t}, steps.cfg, jb, steps.lcfg.ctx())[0])(tr)
    assert abs(nll - float(ref)) <= 1e-4 * abs(float(ref)), (nll, float(ref))
    for k, g in grads.items():
        g = np.asarray(g)
        assert np.abs(run.grad[k] - g).max() <= 1e-3 * np.abs(g).max(), k


def test_kill_nine_then_resume_equals_uninterrupted(sharded_runs, tmp_path):
    """kill -9 at two moments of a 24-step run + ``--resume`` (checkpoints every step), with
    a budget that saves every layer's residuals (the no-recompute path): the per-shard state
    and every step's loss equal the uninterrupted run's bit for bit."""
    d, _, bundle, dev = sharded_runs("gpt2-lora")
    data = d.parent / "data.txt"
    ref = tmp_path / "ref"
    budget = 100_000   # MB: room for everything, in this process and in the killed ones
    device_train(bundle, [data], ref, steps=24, battery="none", memory_budget_mb=budget)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mobiletune.runtime", "train", str(bundle), "--data", str(data),
           "--out", str(out), "--battery", "none", "--checkpoint-every", "1", "--steps", "24",
           "--memory-budget-mb", str(budget)]
    kill_after_steps(lambda resume: subprocess.Popen(
        cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL), out, (4, 13))
    assert device_train(bundle, [data], out, steps=24, battery="none", resume=True,
                        memory_budget_mb=budget).finished
    a, b = st.load(ref / "state.safetensors"), st.load(out / "state.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert losses(ref) == losses(out)


def test_streamed_state_equals_the_in_ram_state_bit_for_bit(sharded_runs, tmp_path):
    """A full fine-tune with its parameters, gradients and moments streamed through the
    memory-mapped state store: every step's loss and the final state equal the in-RAM
    run's (the fixture's) bit for bit."""
    from mobiletune.runtime.device_trainer import DeviceTrainer
    from mobiletune.runtime.sharded.host_state import HostState
    d, _, bundle, dev = sharded_runs("gemma3-full")
    m = read_manifest(bundle)
    assert not HostState(m, tmp_path / "a").store.streamed   # the rule: a tiny state in RAM,
    assert HostState(m, tmp_path / "b", memory_budget_mb=0.01).store.streamed  # > budget/2
    out = tmp_path / "streamed"
    t = DeviceTrainer.open(bundle, [d.parent / "data.txt"], out, battery="none",
                           state_store="disk", checkpoint_every=5, head="program")
    assert t.runner.state.store.streamed
    assert t.run(10).finished
    a, b = st.load(dev / "state.safetensors"), st.load(out / "state.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert losses(dev) == losses(out)


def test_kill_nine_then_resume_with_the_streamed_state(sharded_runs, tmp_path):
    """kill -9 of a full fine-tune whose state streams through the store file (killed at
    two moments, checkpoints every step), then ``--resume``: the state and every loss
    equal the uninterrupted in-RAM run's bit for bit."""
    d, _, bundle, dev = sharded_runs("gemma3-full")
    data = d.parent / "data.txt"
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mobiletune.runtime", "train", str(bundle), "--data", str(data),
           "--out", str(out), "--battery", "none", "--checkpoint-every", "1",
           "--state-store", "disk", "--head", "program"]
    kill_after_steps(lambda resume: subprocess.Popen(
        cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL), out, (3, 7))
    assert device_train(bundle, [data], out, battery="none", resume=True,
                        state_store="disk", head="program").finished
    a, b = st.load(dev / "state.safetensors"), st.load(out / "state.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert losses(dev) == losses(out)


def test_tokens_outside_the_models_vocabulary_are_refused(tmp_path):
    """A bundle whose tokenizer (GPT-2's, 50,257) outgrows the model (vocabulary 107):
    one clear error before training, not an index error deep in a step."""
    from mobiletune import assets
    from mobiletune.errors import MobiletuneError
    from mobiletune.runtime.device_trainer import prepare_data
    from mobiletune.runtime.tokenizer import Tokenizer
    cfg = ModelConfig.from_hf_config(TINY_HF["llama"])
    params = models.init_params(cfg, jax.random.PRNGKey(0), as_numpy=True)
    save_hf_dir(tmp_path / "m", cfg, params, tokenizer=preset_tokenizer("gpt2"))
    export_sharded(tiny_recipe(tmp_path / "m", "lora"), tmp_path / "b", (2,), program=False)
    data = tmp_path / "d.txt"
    data.write_text(assets.read_text("botchan")[:3000], encoding="utf-8")

    class Bundle:
        manifest = read_manifest(tmp_path / "b")
    with pytest.raises(MobiletuneError, match="outside the model's vocabulary of 107"):
        prepare_data(Bundle, Tokenizer.from_dir(tmp_path / "b"), [data])
