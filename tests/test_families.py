"""The family specs: the registry, shapes against transformers, HF round trips, errors, and
that the package stays standard-library only."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from mobiletune import assets, families
from mobiletune.families import ConfigError, ModelConfig
from tests.tiny import TINY_HF, torch_model

MATH = ("embed", "block", "final_norm", "output_weight", "init_layer")


def test_the_registry_finds_every_family():
    assert {"gpt2", "llama", "qwen2", "gemma3"} <= set(families.FAMILIES)
    tested = {families.by_hf_model_type(h["model_type"]).name for h in TINY_HF.values()}
    assert tested == set(families.FAMILIES)  # every family has its parity test (tests/tiny.py)
    for name, s in families.SPECS.items():
        assert s.name == name and families.spec(name) is s
        for mt in s.hf_model_types:
            assert families.by_hf_model_type(mt) is s
        assert s.gguf is not None and families.GGUF_ARCHS[s.gguf.arch] is s
        math = importlib.import_module(s.math)
        assert all(callable(getattr(math, f, None)) for f in MATH), name
    assert families.by_hf_model_type("gemma3") is families.spec("gemma3")
    assert len(families.PRESETS) == sum(len(s.presets) for s in families.SPECS.values())


@pytest.mark.parametrize("name", sorted(TINY_HF))
def test_param_shapes_equal_transformers(name):
    cfg = ModelConfig.from_hf_config(TINY_HF[name])
    sd = {k: tuple(v.shape) for k, v in torch_model(name).state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    assert families.spec(cfg.family).param_shapes(cfg) == sd


def test_families_import_no_jax_or_numpy():
    code = ("import sys, mobiletune.families as f; f.preset('gemma3-270m').num_params; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'numpy', 'torch')); "
            "assert not bad, bad; assert len(f.SPECS) == 4")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", sorted(families.PRESETS))
def test_presets_round_trip_through_hf(name):
    cfg = families.preset(name)
    s = families.spec(cfg.family)
    hf = cfg.to_hf_dict()
    assert hf["model_type"] == s.hf_model_types[0] and hf["architectures"] == [s.hf_architecture]
    assert s.from_hf(hf) == cfg and ModelConfig.from_hf_config(hf) == cfg
    tok = families.PRESETS[name].tokenizer
    assert tok in assets.MODEL_ASSETS or tok in assets.TOKENIZER_ASSETS


def test_unknown_family_model_type_and_preset_are_one_clear_error():
    with pytest.raises(ConfigError, match=r"unknown model family 'mamba'; expected one of .*'gpt2'"):
        families.spec("mamba")
    with pytest.raises(ConfigError, match=r"unknown model family 'mamba'"):
        families.preset("gpt2", family="mamba")
    with pytest.raises(ConfigError, match=r"unsupported model_type 'mamba'; supported: .*'gemma3_text'"):
        ModelConfig.from_hf_config({"model_type": "mamba"})
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'; known: .*'smollm2-135m'"):
        families.preset("gpt5")


@pytest.mark.parametrize("family", sorted(families.FAMILIES))
def test_spec_names_are_real_parameters(family):
    """Every module or name a spec lists exists in the model it describes (biases on)."""
    s = families.spec(family)
    hf = next(h for h in TINY_HF.values() if families.by_hf_model_type(h["model_type"]) is s)
    cfg = ModelConfig.from_hf_config(hf).replace(tie_embeddings=False, attention_bias=True,
                                                 mlp_bias=True)
    shapes = s.param_shapes(cfg)
    layer = {k.rsplit(".", 1)[0] for k in s.layer_shapes(cfg)}
    outer = [s.embed, s.head, *s.final_norm] + ([s.positions] if s.positions else [])
    assert all(n in shapes for n in outer)
    assert all(m in layer for m in s.conv1d_modules)
    assert set(s.gguf.blocks.values()) == layer
    assert all(m in layer for m in s.gguf.permuted)
    assert all(any(m.endswith("." + t) for m in layer) for t in s.peft_default_targets)
    assert s.no_decay(s.embed) and all(s.no_decay(n) for n in s.final_norm)


def test_each_familys_decay_rule_agrees_with_the_rule_of_all_families():
    """The trainer masks weight decay by its family's rule; a caller that passes no family
    (the sharded exporter) by all families' rules: on every family's names they agree."""
    from mobiletune.models import lora
    from mobiletune.train.optim import OptimConfig, decay_mask
    for name in TINY_HF:
        cfg = ModelConfig.from_hf_config(TINY_HF[name]).replace(tie_embeddings=False)
        names = list(families.spec(cfg.family).param_shapes(cfg))
        names += [m + s for m in lora.linear_modules(cfg) for s in lora.SUFFIXES]
        mask = decay_mask(dict.fromkeys(names), OptimConfig(), cfg.family)
        assert mask == decay_mask(dict.fromkeys(names), OptimConfig()), name
        assert any(mask.values()) and not all(mask.values()), name
