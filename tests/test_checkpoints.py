"""HF directories: save -> transformers.from_pretrained -> same logits; sharded loading;
and bad checkpoints give one clear error line naming the key or file."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mobiletune import models
from mobiletune.cli import main
from mobiletune.errors import CheckpointError
from mobiletune.formats.hf import check_params, load_hf_dir, save_hf_dir
from mobiletune.io import safetensors as st
from mobiletune.models.config import ModelConfig
from tests.tiny import TINY_HF, state_dict_numpy, torch_logits, torch_model


def tiny_params(name):
    cfg = ModelConfig.from_hf_config(TINY_HF[name])
    return cfg, check_params(state_dict_numpy(torch_model(name)), cfg, name)


@pytest.mark.parametrize("name", ["gpt2", "qwen2-untied", "llama", "gemma3"])
def test_saved_dir_loads_in_transformers_with_same_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM
    cfg, params = tiny_params(name)
    save_hf_dir(tmp_path, cfg, params)
    tm = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 11)).astype(np.int32)
    ours, _ = models.forward({k: jnp.asarray(v) for k, v in params.items()}, cfg, jnp.asarray(toks))
    assert np.abs(np.asarray(ours) - torch_logits(tm, toks)).max() <= 1e-4
    cfg2, params2 = load_hf_dir(tmp_path)
    assert cfg2 == cfg and all(np.array_equal(params[k], params2[k]) for k in params)


def test_sharded_index_loads(tmp_path):
    cfg, params = tiny_params("llama")
    names = sorted(params)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for f, ks in shards.items():
        st.save(tmp_path / f, {k: params[k] for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    _, loaded = load_hf_dir(tmp_path)
    assert all(np.array_equal(params[k], loaded[k]) for k in params)


@pytest.fixture()
def saved(tmp_path):
    cfg, params = tiny_params("qwen2-tied")
    save_hf_dir(tmp_path, cfg, params)
    return tmp_path, cfg, params


def test_missing_key_is_named(saved):
    d, cfg, params = saved
    del params["model.layers.1.self_attn.k_proj.bias"]
    st.save(d / "model.safetensors", params)
    with pytest.raises(CheckpointError, match=r"missing key 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_hf_dir(d)


def test_wrong_shape_is_named(saved):
    d, cfg, params = saved
    params["model.norm.weight"] = np.zeros(7, np.float32)
    st.save(d / "model.safetensors", params)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(7,\)"):
        load_hf_dir(d)


def test_truncated_safetensors_is_named(saved):
    d, _, _ = saved
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_hf_dir(d)


def test_unknown_model_type(saved):
    d, _, _ = saved
    hf = json.loads((d / "config.json").read_text())
    hf["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="unsupported model_type 'mamba'"):
        load_hf_dir(d)


def test_cli_errors_are_one_line_without_traceback(saved, tmp_path, capsys):
    d, _, _ = saved
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert main(["ppl", "--model", str(d), "--text", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mobiletune: error: {bad}: not UTF-8: byte 0xe9 at byte offset 3 (line 1)"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["ppl", "--model", str(d), "--text", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_subprocess_exit_code_and_no_traceback(saved):
    d, _, _ = saved
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    r = subprocess.run([sys.executable, "-m", "mobiletune", "generate", "--model", str(d),
                        "--prompt", "hi"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("mobiletune: error:") and "model.safetensors" in r.stderr
