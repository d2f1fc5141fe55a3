"""The desktop trainer end to end on a small random GPT-2 with the real GPT-2 tokenizer
and real text: outputs that PEFT and transformers load, exact resume after kill -9,
recipe overrides and their errors."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mobiletune import models
from mobiletune.cli import main
from mobiletune.errors import MobiletuneError
from mobiletune.formats.hf import load_hf_dir
from mobiletune.formats.peft import load_adapter
from mobiletune.io import safetensors as st
from mobiletune.models.lora import LoraConfig
from mobiletune.train.optim import OptimConfig
from mobiletune.train.recipe import Recipe, apply_overrides
from tests.helpers import kill_after_steps, losses, write_recipe
from tests.tiny import tiny_gpt2_dir, torch_logits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_gpt2_dir(tmp_path_factory.mktemp("tinygpt2"))


@pytest.fixture(scope="module")
def recipe_file(model_dir, tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("recipes") / "tiny.py", Recipe(
        name="tiny", model=str(model_dir), data=("botchan",), seq_len=32, micro_batch=2,
        accumulation=2, steps=6, lora=LoraConfig(r=4, alpha=8, dropout=0.1),
        optim=OptimConfig(lr=1e-2, warmup_steps=2), eval_every=3, eval_batches=2,
        checkpoint_every=2))


@pytest.fixture(scope="module")
def lora_run(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", str(recipe_file), "--out", str(out)]) == 0
    return out


def test_lora_run_writes_metrics_plot_and_outputs(lora_run):
    rows = [json.loads(x) for x in (lora_run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"step", "loss", "lr", "tokens", "seconds"} <= set(r) for r in steps)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    assert (lora_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["finished"] and summary["step"] == 6


def test_trained_adapter_and_merged_model_agree_with_peft_and_transformers(lora_run, model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    cfg, base = load_hf_dir(model_dir)
    lcfg, ad = load_adapter(lora_run / "adapter", cfg)
    assert any(np.abs(v).max() > 0 for k, v in ad.items() if "lora_B" in k)  # it trained
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 10)).astype(np.int32)
    ours, _ = models.forward({k: jnp.asarray(v) for k, v in {**base, **ad}.items()},
                             cfg, jnp.asarray(toks), lora=lcfg.ctx())
    tm = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    pm = PeftModel.from_pretrained(tm, lora_run / "adapter").eval()
    assert np.abs(np.asarray(ours) - torch_logits(pm, toks)).max() <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged").float().eval()
    assert np.abs(np.asarray(ours) - torch_logits(merged, toks)).max() <= 1e-4


def test_ppl_with_adapter_equals_merged_model(lora_run, model_dir, capsys):
    args = ["--text", "botchan", "--seq-len", "64", "--max-windows", "2"]
    assert main(["ppl", "--model", str(model_dir), "--adapter", str(lora_run / "adapter"), *args]) == 0
    with_adapter = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["ppl", "--model", str(lora_run / "merged"), *args]) == 0
    merged = capsys.readouterr().out.strip().splitlines()[-1]
    a, b = float(with_adapter.split()[0][4:]), float(merged.split()[0][4:])
    assert abs(a / b - 1) < 1e-5 and with_adapter.split()[1] == merged.split()[1]


def test_resume_after_kill_equals_uninterrupted_run(recipe_file, tmp_path):
    """kill -9 in the middle of training (several times), --resume: the final adapter and the
    per-step losses equal an uninterrupted run's bit for bit."""
    sets = ["--set", "steps=40", "--set", "checkpoint_every=4", "--set", "eval_every=0",
            "--set", "save_merged=false"]
    ref = tmp_path / "ref"
    assert main(["train", str(recipe_file), "--out", str(ref), *sets]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mobiletune", "train", str(recipe_file), "--out", str(out), *sets]
    kill_after_steps(lambda resume: subprocess.Popen(
        cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL), out, (7, 13, 22))
    assert main(["train", str(recipe_file), "--out", str(out), "--resume", *sets]) == 0
    a = st.load(ref / "adapter" / "adapter_model.safetensors")
    b = st.load(out / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert losses(ref) == losses(out) and len(losses(ref)) == 40


def test_full_fine_tuning_saves_a_transformers_checkpoint(recipe_file, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "full"
    assert main(["train", str(recipe_file), "--out", str(out), "--set", "lora=none",
                 "--set", "steps=3", "--set", "optim.lr=1e-3"]) == 0
    cfg, params = load_hf_dir(out / "model")
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 9)).astype(np.int32)
    ours, _ = models.forward({k: jnp.asarray(v) for k, v in params.items()}, cfg, jnp.asarray(toks))
    tm = AutoModelForCausalLM.from_pretrained(out / "model").float().eval()
    assert np.abs(np.asarray(ours) - torch_logits(tm, toks)).max() <= 1e-4


def test_overrides_parse_by_type():
    r = Recipe(name="x", model="m", data=("a",), lora=LoraConfig(), optim=OptimConfig())
    r2 = apply_overrides(r, ["steps=7", "optim.lr=3e-4", "lora.r=16", "data=a.txt,b.txt",
                             "lora.target_modules=q_proj,k_proj", "lora.use_rslora=true",
                             "optim.clip_norm=none"])
    assert (r2.steps, r2.optim.lr, r2.lora.r, r2.data) == (7, 3e-4, 16, ("a.txt", "b.txt"))
    assert r2.lora.target_modules == ("q_proj", "k_proj") and r2.lora.use_rslora
    assert r2.optim.clip_norm is None
    assert apply_overrides(r, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"
    assert apply_overrides(r, ["lora=none"]).lora is None
    with pytest.raises(MobiletuneError, match="unknown key 'stepz'"):
        apply_overrides(r, ["stepz=3"])
    with pytest.raises(MobiletuneError, match=r"steps='many': expected int"):
        apply_overrides(r, ["steps=many"])
    with pytest.raises(MobiletuneError, match="must be positive"):
        apply_overrides(r, ["micro_batch=0"])


def test_cli_bad_override_is_one_line(recipe_file, tmp_path, capsys):
    assert main(["train", str(recipe_file), "--out", str(tmp_path), "--set", "optim.lr=fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mobiletune: error: --set optim.lr='fast': expected float"]
