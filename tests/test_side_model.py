"""The side network (``mobiletune.models.side``) and what crosses the link
(``runtime.side.quantize``), without a server: a fresh side network leaves every family's
model exactly as it was, and the quantizers stay within half a quantization step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobiletune import families, models
from mobiletune.models import side as SD
from mobiletune.models.config import ModelConfig
from mobiletune.runtime.side import quantize as Q
from mobiletune.runtime.side.config import SideConfig
from mobiletune.side.steps import SideSteps
from mobiletune.train.loss import batch_nll
from mobiletune.train.optim import OptimConfig, make_optimizer
from tests.tiny import TINY_HF

CONFIGS = [SideConfig(reduction=2), SideConfig(reduction=3, layers=(0,)),
           SideConfig(reduction=2, width="pooled"), SideConfig(cut=1, rank=2)]


def _setup(family):
    cfg = ModelConfig.from_hf_config(TINY_HF[family])
    base = models.init_params(cfg, jax.random.PRNGKey(0))
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    return cfg, base, toks


@pytest.mark.parametrize("family", sorted(TINY_HF))
def test_a_fresh_side_network_is_the_backbone(family):
    """Logits and the step-0 loss of backbone + fresh side network equal the backbone's
    (1e-6); a side network whose ``up`` is not zero changes them (the test can fail)."""
    cfg, base, toks = _setup(family)
    ref, _ = models.forward(base, cfg, toks)
    batch = {"inputs": toks, "targets": jnp.roll(toks, -1, 1),
             "loss_mask": jnp.ones(toks.shape, jnp.float32)}
    ref_nll, _ = batch_nll(base, cfg, batch)
    for scfg in CONFIGS:
        if scfg.width == "pooled" and cfg.hidden_size % scfg.reduction:
            continue
        side = {k: jnp.asarray(v) for k, v in SD.init_side(cfg, scfg, jax.random.PRNGKey(1)).items()}
        assert set(side) == set(SD.side_shapes(cfg, scfg))
        got = SD.side_logits(side, base, cfg, scfg, toks)
        assert float(jnp.abs(got - ref).max()) <= 1e-6, scfg
        taps, last = SD.backbone_taps(base, cfg, scfg, toks)
        steps = SideSteps(cfg, scfg, make_optimizer(OptimConfig()))
        nll, _ = steps.nll(side, base, batch, taps, last)
        assert abs(float(nll) - float(ref_nll)) <= 1e-6 * abs(float(ref_nll)), scfg
        zero = [k for k in side if k == "side.up.weight" or k.endswith(".lora_B.weight")]
        assert zero and all(float(jnp.abs(side[k]).max()) == 0.0 for k in zero)
        moved = {**side, **{k: jax.random.normal(jax.random.PRNGKey(2), side[k].shape)
                            for k in zero}}
        assert float(jnp.abs(SD.side_logits(moved, base, cfg, scfg, toks) - ref).max()) > 1e-3


def test_side_config_errors_name_the_key():
    from mobiletune.errors import MobiletuneError
    with pytest.raises(MobiletuneError, match="side.precision='int3'"):
        SideConfig(precision="int3")
    with pytest.raises(MobiletuneError, match=r"side.layers=\[5\]"):
        SideConfig(layers=(5,)).tapped(4)
    with pytest.raises(MobiletuneError, match="not a multiple of side.reduction=4"):
        SideConfig(width="pooled", reduction=4).tap_width(30)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_integer_quantizers_stay_within_half_a_step(precision):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 17, 41)).astype(np.float32)
    h[:, 0, :3] *= 1000  # a "massive activation" token: its own scale, not everyone's
    h[1, 5] = 0          # an all-zero token
    parts = Q.quantize(h, precision)
    back = Q.dequantize(parts, precision, h.shape[-1])
    step = parts["scale"][..., None]
    assert (np.abs(back - h) <= 0.5 * step * (1 + 1e-6)).all()
    assert back.shape == h.shape and np.array_equal(back[1, 5], h[1, 5])
    bytes_per_token = Q.payload_bytes(h.shape, precision) / (3 * 17)
    assert bytes_per_token == (41 + 4 if precision == "int8" else 21 + 4)
    assert sum(a.nbytes for a in parts.values()) == Q.payload_bytes(h.shape, precision)


def test_float_transfers_and_pooling():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((2, 5, 12)).astype(np.float32)
    assert np.array_equal(Q.dequantize(Q.quantize(h, "fp32"), "fp32", 12), h)
    half = Q.dequantize(Q.quantize(h, "fp16"), "fp16", 12)
    assert np.allclose(half, h, rtol=2 ** -11, atol=0)
    assert np.allclose(Q.pool(h, 3), h.reshape(2, 5, 4, 3).mean(-1))


@pytest.mark.parametrize("family", sorted(TINY_HF))
def test_the_phone_folds_a_cut_adapter_as_peft_merge_does(family):
    """``runtime.side.infer.merged_top_weights`` (numpy, the phone) equals
    ``models.lora.merge`` (JAX) on a trained-looking adapter of every family (GPT-2's Conv1D
    weights are stored (in, out)); only layers >= cut change."""
    from mobiletune.models.lora import merge
    from mobiletune.runtime.side.infer import merged_top_weights
    cfg, base, _ = _setup(family)
    scfg = SideConfig(cut=1, rank=2, alpha=3.0)
    rng = np.random.default_rng(0)
    side = {k: rng.standard_normal(v.shape).astype(np.float32)
            for k, v in SD.init_side(cfg, scfg, jax.random.PRNGKey(1)).items()}
    got = merged_top_weights(side, lambda n: np.asarray(base[n]), scfg, cfg.family)
    ref = merge(base, {k[len("side."):]: jnp.asarray(v) for k, v in side.items()}, cfg,
                SD.top_lora(cfg, scfg))
    assert got and not any(n.startswith(families.spec(cfg.family).prefix(0)) for n in got)
    for n, v in got.items():
        np.testing.assert_allclose(v, np.asarray(ref[n]), rtol=0, atol=1e-5, err_msg=n)
        assert np.abs(v - np.asarray(base[n])).max() > 1e-3
