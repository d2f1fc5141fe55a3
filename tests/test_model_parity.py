"""Every family against transformers (fp32, CPU) on tiny random configs."""

import jax.numpy as jnp
import numpy as np
import pytest

from mobiletune import models
from mobiletune.formats.hf import check_params
from mobiletune.models.config import ModelConfig
from tests.tiny import SEQ_LEN, TINY_HF, state_dict_numpy, torch_logits, torch_model

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_HF))
def pair(request):
    tm = torch_model(request.param)
    cfg = ModelConfig.from_hf_config(TINY_HF[request.param])
    params = check_params(state_dict_numpy(tm), cfg, request.param)
    return request.param, tm, cfg, {k: jnp.asarray(v) for k, v in params.items()}


def tokens_for(cfg, batch=2, seq=SEQ_LEN, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


def test_logits_match_transformers(pair):
    name, tm, cfg, params = pair
    toks = tokens_for(cfg)
    ours, _ = models.forward(params, cfg, jnp.asarray(toks))
    ref = torch_logits(tm, toks)
    assert np.abs(np.asarray(ours) - ref).max() <= TOL, name


def test_kv_cache_decode_equals_full_forward(pair):
    name, _, cfg, params = pair
    toks = jnp.asarray(tokens_for(cfg, batch=2, seq=SEQ_LEN))
    full, _ = models.forward(params, cfg, toks)
    cache = models.new_cache(cfg, batch=2, max_len=SEQ_LEN + 3)
    prefill = 4                      # a chunk, then one token at a time
    out, cache = models.forward(params, cfg, toks[:, :prefill], cache)
    steps = [out]
    for t in range(prefill, SEQ_LEN):
        out, cache = models.forward(params, cfg, toks[:, t:t + 1], cache)
        steps.append(out)
    cached = jnp.concatenate(steps, axis=1)
    assert int(cache.length) == SEQ_LEN
    assert np.abs(np.asarray(cached) - np.asarray(full)).max() <= 1e-5, name


def test_config_round_trips_through_hf_dict(pair):
    _, _, cfg, _ = pair
    assert ModelConfig.from_hf_config(cfg.to_hf_dict()) == cfg


def test_param_shapes_equal_transformers_state_dict(pair):
    name, tm, cfg, _ = pair
    sd = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    assert models.param_shapes(cfg) == sd, name
