"""Tiny random Hugging Face configs with distinct prime-ish dimensions (so shape bugs
cannot cancel), and helpers to build the matching transformers model."""

from __future__ import annotations

import numpy as np

TINY_HF = {
    "gpt2": dict(model_type="gpt2", vocab_size=97, n_embd=35, n_layer=2, n_head=5, n_inner=53,
                 n_positions=64, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                 eos_token_id=0),
    "qwen2-tied": dict(model_type="qwen2", vocab_size=101, hidden_size=42, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=14,
                       intermediate_size=59, max_position_embeddings=128, rms_norm_eps=1e-6,
                       rope_theta=10000.0, tie_word_embeddings=True),
    "qwen2-untied": dict(model_type="qwen2", vocab_size=103, hidden_size=42,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                         head_dim=14, intermediate_size=61, max_position_embeddings=128,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
    "llama": dict(model_type="llama", vocab_size=107, hidden_size=30, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=3, head_dim=10,
                  intermediate_size=47, max_position_embeddings=128, rms_norm_eps=1e-5,
                  rope_theta=100000.0, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", vocab_size=109, hidden_size=36, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=14,
                   intermediate_size=46, max_position_embeddings=128, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=12, final_logit_softcapping=30.0,
                   attn_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh",
                   bos_token_id=2, eos_token_id=1, pad_token_id=0),
}
SEQ_LEN = 13  # longer than gemma3's sliding window of 5


def torch_model(name: str, seed: int = 0):
    """A transformers model for TINY_HF[name], with every parameter randomised (norm
    weights too, so (1 + w) vs w mistakes show)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = dict(TINY_HF[name])
    cfg = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.float().eval()


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def tiny_dir_with_gpt2_tokenizer(path, family: str, seed: int = 0):
    """TINY_HF[family] with GPT-2's vocabulary (50,257) and real tokenizer, on disk."""
    import jax

    from mobiletune import assets, models
    from mobiletune.formats.hf import save_hf_dir
    from mobiletune.models.config import ModelConfig
    from mobiletune.runtime.tokenizer import Tokenizer
    cfg = ModelConfig.from_hf_config({**TINY_HF[family], "vocab_size": 50257})
    params = {k: np.asarray(v) for k, v in models.init_params(cfg, jax.random.PRNGKey(seed)).items()}
    f = assets.tokenizer_files("gpt2")
    save_hf_dir(path, cfg, params, tokenizer=Tokenizer.from_gpt2_files(f["vocab.json"],
                                                                       f["merges.txt"]))
    return path


def tiny_gpt2_dir(path, seed: int = 0, n_layer: int = 2, n_embd: int = 48):
    """A small random GPT-2 HF directory with the real GPT-2 tokenizer (vocab 50,257), on
    disk like any user checkpoint: config.json, model.safetensors, tokenizer files."""
    import jax

    from mobiletune import assets, models
    from mobiletune.formats.hf import save_hf_dir
    from mobiletune.models.config import preset
    from mobiletune.runtime.tokenizer import Tokenizer
    cfg = preset("gpt2", num_layers=n_layer, hidden_size=n_embd, num_heads=4, num_kv_heads=4,
                 head_dim=n_embd // 4, intermediate_size=4 * n_embd, max_position=256)
    params = {k: np.asarray(v) for k, v in models.init_params(cfg, jax.random.PRNGKey(seed)).items()}
    f = assets.tokenizer_files("gpt2")
    tok = Tokenizer.from_gpt2_files(f["vocab.json"], f["merges.txt"])
    save_hf_dir(path, cfg, params, tokenizer=tok)
    return path


def tiny_recipe(model_dir, family: str = "llama", mode: str = "lora", micro_batch: int = 2,
                seq_len: int = 12, **kw):
    """A recipe over ``TINY_HF[family]`` saved (random init, norms off identity) to
    ``model_dir`` with GPT-2's tokenizer: LoRA on every linear layer, or full fine-tuning."""
    import jax

    from mobiletune import models
    from mobiletune.formats.hf import save_hf_dir
    from mobiletune.formats.loading import preset_tokenizer
    from mobiletune.models.config import ModelConfig
    from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe
    cfg = ModelConfig.from_hf_config(TINY_HF[family])
    params = models.init_params(cfg, jax.random.PRNGKey(0))
    params = {k: (v + 0.1 * jax.random.normal(jax.random.PRNGKey(len(k)), v.shape)
                  if "norm" in k or "ln_" in k else v) for k, v in params.items()}
    save_hf_dir(model_dir, cfg, {k: np.asarray(v) for k, v in params.items()},
                tokenizer=preset_tokenizer("gpt2"))
    return Recipe(**{"name": "tiny", "model": str(model_dir), "data": ("unused",),
                     "seq_len": seq_len, "micro_batch": micro_batch, "steps": 100,
                     "lora": LoraConfig(r=4, alpha=8, target_modules="all-linear")
                     if mode == "lora" else None,
                     "optim": OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant",
                                          weight_decay=0.01), **kw})
