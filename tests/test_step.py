"""The pure training step: chunked loss, gradient accumulation, optimizer pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobiletune import models
from mobiletune.models import lora
from mobiletune.models.config import ModelConfig
from mobiletune.train.loss import batch_nll
from mobiletune.train.optim import OptimConfig, decay_mask, make_optimizer, schedule
from mobiletune.train.step import Steps
from tests.tiny import TINY_HF


def tiny(name="llama", seed=0):
    cfg = ModelConfig.from_hf_config(TINY_HF[name])
    return cfg, models.init_params(cfg, jax.random.PRNGKey(seed))


def batch(cfg, b, t, seed=0, ragged=True):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    if ragged:  # different numbers of counted tokens per row, as with masked prompts
        for i in range(b):
            mask[i, : rng.integers(0, t // 2)] = 0
    return {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
            "loss_mask": jnp.asarray(mask)}


@pytest.mark.parametrize("name", ["gemma3", "gpt2"])
def test_chunked_loss_equals_full_logits(name):
    cfg, params = tiny(name)
    bt = batch(cfg, 2, 13)
    logits, _ = models.forward(params, cfg, bt["inputs"])
    logp = jax.nn.log_softmax(logits, -1)
    ref = -(jnp.take_along_axis(logp, bt["targets"][..., None], -1)[..., 0] * bt["loss_mask"]).sum()
    for chunk in (1, 4, 5, 64):
        nll, count = batch_nll(params, cfg, bt, chunk=chunk)
        assert abs(float(nll) - float(ref)) <= 1e-4 * abs(float(ref))
        assert float(count) == float(bt["loss_mask"].sum())
    g_ref = jax.grad(lambda p: -(jnp.take_along_axis(jax.nn.log_softmax(models.forward(p, cfg, bt["inputs"])[0], -1),
                                                     bt["targets"][..., None], -1)[..., 0] * bt["loss_mask"]).sum())(params)
    g = jax.grad(lambda p: batch_nll(p, cfg, bt, chunk=4)[0])(params)
    for k in params:
        np.testing.assert_allclose(g[k], g_ref[k], atol=2e-5, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_accumulation_equals_one_big_batch(mode, opt):
    """4 micro-batches of 2 == one batch of 8: the mean gradient within 1e-6, and the
    trajectory after 3 steps within 1e-6 (SGD: the update is linear in the gradient; AdamW:
    its normalisation amplifies round-off on near-zero gradients, so we compare the losses
    to 1e-6 and the params to 1e-6 relative to the learning rate's scale)."""
    cfg, params = tiny("llama")
    if mode == "lora":
        lcfg = lora.LoraConfig(r=4, alpha=8, target_modules="all-linear")
        trainable, frozen = lora.init_lora(cfg, lcfg, jax.random.PRNGKey(1)), params
    else:
        lcfg, trainable, frozen = None, params, {}
    oc = OptimConfig(name=opt, lr=1e-2, warmup_steps=2, weight_decay=0.1, momentum=0.9)
    s = Steps(cfg, lcfg, make_optimizer(oc))
    steps = s.jitted()
    big = batch(cfg, 8, 11, seed=3)
    key = jax.random.PRNGKey(0)
    state_a, state_b = s.init(trainable), s.init(jax.tree.map(jnp.copy, trainable))
    for i_step in range(3):
        acc_a = steps.accumulate(s.zero_accum(state_a.trainable), state_a.trainable, frozen, big, key)
        acc = s.zero_accum(state_b.trainable)
        for i in range(4):
            micro = {k: v[2 * i: 2 * i + 2] for k, v in big.items()}
            acc = steps.accumulate(acc, state_b.trainable, frozen, micro, key)
        if i_step == 0:
            for k in acc.grads:
                np.testing.assert_allclose(acc.grads[k] / acc.count, acc_a.grads[k] / acc_a.count,
                                           atol=1e-6, err_msg=k)
        state_a, loss_a = steps.apply(state_a, acc_a)
        state_b, loss_b = steps.apply(state_b, acc)
        assert abs(float(loss_a) - float(loss_b)) <= 1e-6 * abs(float(loss_a))  # relative: a sum of ~90 terms
    tol = 1e-6 if opt == "sgd" else 1e-3 * oc.lr
    for k in state_a.trainable:
        np.testing.assert_allclose(state_a.trainable[k], state_b.trainable[k], atol=tol, err_msg=k)
    one, loss_one = steps.train_step(s.init(jax.tree.map(jnp.copy, state_b.trainable)), frozen,
                                     big, key)
    assert np.isfinite(float(loss_one))


def test_decay_mask_spares_norms_biases_embeddings():
    cfg, params = tiny("qwen2-tied")
    m = decay_mask(params, OptimConfig())
    assert m["model.layers.0.self_attn.q_proj.weight"]
    assert not m["model.layers.0.self_attn.q_proj.bias"]
    assert not m["model.layers.0.input_layernorm.weight"]
    assert not m["model.embed_tokens.weight"]


def test_warmup_then_cosine():
    s = schedule(OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine"))
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(60)) - 0.5) < 1e-6 and float(s(110)) < 1e-6


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fused_train_step_equals_accumulate_then_apply(mode):
    """The trainer's one-micro-batch path (``train_step``, the state donated) takes the
    steps that ``accumulate`` + ``apply`` take: the same params after 3 AdamW steps with
    LoRA dropout, to 1e-7 relative (measured here: bit for bit)."""
    cfg, params = tiny("gpt2")
    if mode == "lora":
        lcfg = lora.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1)
        trainable, frozen = lora.init_lora(cfg, lcfg, jax.random.PRNGKey(1)), params
    else:
        lcfg, trainable, frozen = None, params, {}
    s = Steps(cfg, lcfg, make_optimizer(OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.1)))
    f = s.jitted()
    a, b = (s.init(jax.tree.map(jnp.array, trainable)) for _ in range(2))
    for i in range(3):
        bt, key = batch(cfg, 4, 9, seed=i), jax.random.PRNGKey(i)
        a, la = f.train_step(a, frozen, bt, key)
        b, lb = f.apply(b, f.accumulate(s.zero_accum(b.trainable), b.trainable, frozen, bt, key))
        assert abs(float(la) - float(lb)) <= 1e-7 * abs(float(lb))
    for k in a.trainable:
        np.testing.assert_allclose(a.trainable[k], b.trainable[k], rtol=1e-7, atol=0, err_msg=k)
    f.train_step(a, frozen, batch(cfg, 4, 9), key)
    with pytest.raises(RuntimeError, match="deleted"):      # a donated state is spent
        np.asarray(a.trainable[k])


@pytest.mark.parametrize("name", ["adafactor", "sgd", "adamw"])
def test_every_optimizer_lowers_the_loss_on_a_fixed_batch(name):
    cfg, params = tiny("gpt2")
    lr = {"adafactor": 1e-2, "sgd": 0.5, "adamw": 3e-3}[name]
    s = Steps(cfg, None, make_optimizer(OptimConfig(name=name, lr=lr, schedule="constant",
                                                    momentum=0.9, weight_decay=0.01)))
    f = s.jitted()
    bt = batch(cfg, 4, 9, seed=5)
    state = s.init(params)
    first = None
    for _ in range(8):
        state, loss = f.train_step(state, {}, bt, jax.random.PRNGKey(0))
        first = float(loss) if first is None else first
    assert float(loss) < first - 0.05, (name, first, float(loss))
