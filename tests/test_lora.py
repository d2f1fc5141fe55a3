"""LoRA against PEFT: target matching, merge, and adapter files both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mobiletune import models
from mobiletune.errors import MobiletuneError
from mobiletune.formats.hf import check_params
from mobiletune.formats.peft import load_adapter, save_adapter
from mobiletune.models import lora
from mobiletune.models.config import ModelConfig
from tests.tiny import TINY_HF, state_dict_numpy, torch_logits, torch_model

FAMILIES = ["gpt2", "qwen2-untied", "llama", "gemma3"]


def setup(name, seed=0):
    tm = torch_model(name, seed)
    cfg = ModelConfig.from_hf_config(TINY_HF[name])
    params = check_params(state_dict_numpy(tm), cfg, name)
    return tm, cfg, {k: jnp.asarray(v) for k, v in params.items()}


def random_adapter(cfg, lcfg, seed=1):
    ad = lora.init_lora(cfg, lcfg, jax.random.PRNGKey(seed))
    k = jax.random.PRNGKey(seed + 100)
    return {n: (0.3 * jax.random.normal(jax.random.fold_in(k, i), v.shape)
                if n.endswith("lora_B.weight") else v)
            for i, (n, v) in enumerate(sorted(ad.items()))}


TARGET_CASES = [None, ("q_proj", "v_proj"), ("c_attn", "c_fc"), r".*\.(q|k)_proj",
                r".*mlp\..*", "all-linear", ("k_proj", "o_proj", "c_proj")]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("layers", [None, (1,)])
def test_target_matching_equals_peft(name, layers):
    from peft import LoraConfig as PeftLora
    from peft.tuners.tuners_utils import check_target_module_exists
    cfg = ModelConfig.from_hf_config(TINY_HF[name])
    modules = lora.linear_modules(cfg)
    for tm in TARGET_CASES:
        if layers and isinstance(tm, str) and tm != "all-linear":
            with pytest.raises(MobiletuneError, match="regex"):
                lora.LoraConfig(target_modules=tm, layers_to_transform=layers)
            continue
        lc = lora.LoraConfig(target_modules=tm, layers_to_transform=layers).resolved(cfg)
        peft_tm = lc.target_modules if isinstance(lc.target_modules, str) else list(lc.target_modules)
        pc = PeftLora(target_modules=peft_tm,
                      layers_to_transform=list(layers) if layers else None)
        ours = {m for m in modules if lora.matches(lc, m)}
        theirs = {m for m in modules if check_target_module_exists(pc, m)}
        assert ours == theirs, (name, tm, layers)


def test_default_targets_are_pefts():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M
    for fam, tm in lora.DEFAULT_TARGETS.items():
        assert set(M["gemma3_text" if fam == "gemma3" else fam]) == set(tm), fam


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_b_equals_base_and_merge_equals_adapter(name):
    _, cfg, params = setup(name)
    lcfg = lora.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    base, _ = models.forward(params, cfg, toks)
    fresh = lora.init_lora(cfg, lcfg, jax.random.PRNGKey(0))
    out, _ = models.forward({**params, **fresh}, cfg, toks, lora=lcfg.ctx())
    assert np.array_equal(np.asarray(out), np.asarray(base))
    ad = random_adapter(cfg, lcfg)
    with_ad, _ = models.forward({**params, **ad}, cfg, toks, lora=lcfg.ctx())
    merged, _ = models.forward(lora.merge(params, ad, cfg, lcfg), cfg, toks)
    assert np.abs(np.asarray(with_ad) - np.asarray(base)).max() > 1e-2  # the adapter matters
    assert np.abs(np.asarray(with_ad) - np.asarray(merged)).max() <= 1e-4


def test_kaiming_uniform_init_bounds():
    cfg = ModelConfig.from_hf_config(TINY_HF["llama"])
    ad = lora.init_lora(cfg, lora.LoraConfig(r=16), jax.random.PRNGKey(0))
    a = np.asarray(ad["model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert a.shape == (16, cfg.hidden_size)
    assert np.abs(a).max() <= 1 / np.sqrt(cfg.hidden_size) and np.abs(a).max() > 0.8 / np.sqrt(cfg.hidden_size)
    assert not np.any(np.asarray(ad["model.layers.0.self_attn.q_proj.lora_B.weight"]))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_loads_in_peft(tmp_path, name, rslora):
    from peft import PeftModel
    tm, cfg, params = setup(name)
    lcfg = lora.LoraConfig(r=4, alpha=12, target_modules=("q_proj", "v_proj", "c_attn", "down_proj"),
                           use_rslora=rslora)
    ad = random_adapter(cfg, lcfg)
    save_adapter(tmp_path, ad, cfg, lcfg)
    pm = PeftModel.from_pretrained(tm, tmp_path).eval()
    toks = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 11)).astype(np.int32)
    ours, _ = models.forward({**params, **ad}, cfg, jnp.asarray(toks), lora=lcfg.ctx())
    assert np.abs(np.asarray(ours) - torch_logits(pm, toks)).max() <= 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_peft_made_adapter_loads_here(tmp_path, name):
    import torch
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    tm, cfg, params = setup(name)
    targets = ["c_attn", "c_fc"] if name == "gpt2" else ["q_proj", "k_proj", "up_proj"]
    torch.manual_seed(5)
    pm = get_peft_model(tm, PeftLora(r=3, lora_alpha=7, target_modules=targets,
                                     init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    pm.save_pretrained(tmp_path)
    lcfg, ad = load_adapter(tmp_path, cfg)
    assert lcfg.r == 3 and lcfg.alpha == 7
    toks = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 12)).astype(np.int32)
    ours, _ = models.forward({**params, **{k: jnp.asarray(v) for k, v in ad.items()}},
                             cfg, jnp.asarray(toks), lora=lcfg.ctx())
    assert np.abs(np.asarray(ours) - torch_logits(pm, toks)).max() <= 1e-4


def test_adapter_for_other_model_is_refused(tmp_path):
    from mobiletune.errors import CheckpointError
    cfg = ModelConfig.from_hf_config(TINY_HF["llama"])
    lcfg = lora.LoraConfig(r=2)
    save_adapter(tmp_path, lora.init_lora(cfg, lcfg, jax.random.PRNGKey(0)), cfg, lcfg)
    other = ModelConfig.from_hf_config(TINY_HF["qwen2-tied"])
    with pytest.raises(CheckpointError, match="has shape"):
        load_adapter(tmp_path, other)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_adapter_gradients_equal_pefts(tmp_path, name):
    """The adapter's gradients through the desktop's LoRA product (its own backward pass,
    ``layers.lora_delta``) equal torch autograd through PEFT's, within 1e-4 relative."""
    import torch
    from peft import PeftModel

    from mobiletune.train.loss import batch_nll
    tm, cfg, params = setup(name)
    lcfg = lora.LoraConfig(r=4, alpha=12, target_modules=("c_attn", "c_fc", "q_proj", "down_proj"))
    ad = random_adapter(cfg, lcfg)
    save_adapter(tmp_path, ad, cfg, lcfg)
    pm = PeftModel.from_pretrained(tm, tmp_path, is_trainable=True).eval()
    toks = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    bt = {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
          "loss_mask": jnp.ones((2, 11), jnp.float32)}
    ours = jax.grad(lambda a: batch_nll({**params, **a}, cfg, bt, lcfg.resolved(cfg).ctx(),
                                        head_trainable=False)[0])(ad)
    logits = pm(input_ids=torch.as_tensor(toks[:, :-1], dtype=torch.long)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      torch.as_tensor(toks[:, 1:].reshape(-1), dtype=torch.long),
                                      reduction="sum").backward()
    ref = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
           for n, p in pm.named_parameters() if p.requires_grad}
    assert set(ref) == set(ours)
    for k, g in ours.items():
        scale = np.abs(ref[k]).max()
        assert scale > 0, k
        np.testing.assert_allclose(np.asarray(g), ref[k], atol=1e-4 * scale, err_msg=k)
