"""Real weights (SmolLM2-135M, Gemma 3 270M GGUFs) against transformers loading the same
GGUF: identical dequantized params and config, and `mobiletune ppl` equal to the
transformers perplexity of the same windows within 0.1 %. Slow (transformers needs
~30 s / ~80 s to load these GGUFs); CI runs them."""

import math

import numpy as np
import pytest

from mobiletune import assets
from mobiletune.cli import main
from mobiletune.formats.gguf import read_gguf
from mobiletune.formats.loading import gguf_tokenizer, read_text
from mobiletune.inference.perplexity import ppl_windows
from mobiletune.models.config import ModelConfig, preset
from tests.helpers import require_asset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real(request):
    import torch
    from transformers import AutoModelForCausalLM
    path = require_asset(assets.model_path, request.param)
    tm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    return request.param, path, tm


def test_params_and_config_equal_transformers_gguf_loading(real):
    name, path, tm = real
    ours = read_gguf(path)
    theirs = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    if ours.config.tie_embeddings:  # transformers lists the tied head as its own key
        assert "lm_head.weight" not in ours.params
        theirs.pop("lm_head.weight", None)
    assert set(ours.params) == set(theirs)
    for k, v in theirs.items():
        np.testing.assert_allclose(ours.params[k], v, rtol=0, atol=1e-6, err_msg=k)
    hf = ModelConfig.from_hf_config(tm.config.to_dict())
    # GGUF stores eps as float32 (1e-5 -> 9.99999975e-06); transformers keeps that value
    assert ours.config.norm_eps == pytest.approx(hf.norm_eps, rel=1e-6)
    assert ours.config == hf.replace(norm_eps=ours.config.norm_eps) == preset(name)
    if name == "gemma3-270m":
        assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"} <= set(ours.quant_types.values())


def transformers_ppl(tm, windows) -> tuple[float, int]:
    import torch
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            x = torch.as_tensor(w[None], dtype=torch.long)
            logp = torch.log_softmax(tm(x).logits[0, :-1].double(), -1)
            total -= logp.gather(-1, x[0, 1:, None]).sum().item()
            count += len(w) - 1
    return math.exp(total / count), count


def test_cli_ppl_equals_transformers(real, capsys):
    name, path, tm = real
    assert main(["ppl", "--model", name, "--text", "botchan", "--seq-len", "512",
                 "--max-windows", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    ppl, tokens = (float(last.split()[0][4:]), int(last.split()[1][7:]))
    tok = gguf_tokenizer(path)
    ids = tok.encode(read_text("botchan"), add_special_tokens=False)
    windows = ppl_windows(ids, 512, 4, tok.bos_id if tok.adds_bos else None)
    ref, ref_tokens = transformers_ppl(tm, windows)
    assert tokens == ref_tokens == (2048 if tok.adds_bos else 2044)
    assert abs(ppl / ref - 1) <= 1e-3, (ppl, ref)
