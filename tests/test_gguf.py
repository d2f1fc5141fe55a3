"""GGUF reading: synthetic files written the way llama.cpp writes them (fast), and the two
real GGUFs compared against transformers' own GGUF loader (slow)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import mobiletune.formats.gguf as gguf_reader
from mobiletune.errors import CheckpointError
from mobiletune.formats.gguf import parse_gguf, read_gguf
from mobiletune.formats.gguf_tokenizer import read_gguf_metadata
from mobiletune.models import param_shapes
from mobiletune.models.config import ModelConfig, preset

TINY = dict(vocab_size=64, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=64, intermediate_size=512, max_position=128, norm_eps=1e-5,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_CFG = {
    "llama": ModelConfig(family="llama", **TINY),
    "qwen2": ModelConfig(family="qwen2", attention_bias=True, **TINY),
    "gemma3": preset("gemma3-270m", **{**TINY, "norm_eps": 1e-6, "rope_theta": 1e6},
                     layer_types=("sliding_attention",) * 2, sliding_window=32,
                     query_pre_attn_scalar=64),
    "gpt2": ModelConfig(family="gpt2", attention_bias=True, mlp_bias=True,
                        hidden_act="gelu_new", **{**TINY, "num_kv_heads": 4}),
}

# HF name pieces -> GGUF names (the inverse of the reader's table, written out independently)
_G = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
      "transformer.wte": "token_embd", "transformer.wpe": "position_embd",
      "transformer.ln_f": "output_norm"}
_B = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
      "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
      "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
      "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
      "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
      "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
      "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _gguf_name(family: str, hf: str) -> str:
    stem, suffix = hf.rsplit(".", 1)
    if stem in _G:
        return f"{_G[stem]}.{suffix}"
    parts = stem.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    if rest == "post_attention_layernorm":
        rest_g = "post_attention_norm" if family == "gemma3" else "ffn_norm"
    else:
        rest_g = _B[rest]
    return f"blk.{i}.{rest_g}.{suffix}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32)
            for k, s in param_shapes(cfg).items()}


def _to_gguf(cfg: ModelConfig, hf: str, w: np.ndarray) -> np.ndarray:
    """What convert_hf_to_gguf.py does to one HF tensor (before quantization)."""
    if cfg.family == "llama" and ".q_proj." in hf:
        w = _permute(w, cfg.num_heads)
    if cfg.family == "llama" and ".k_proj." in hf:
        w = _permute(w, cfg.num_kv_heads)
    if cfg.family == "gemma3" and hf.endswith("norm.weight"):
        w = w + 1.0
    if cfg.family == "gpt2" and hf.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        w = w.T
    return np.ascontiguousarray(w)


def _write(path: Path, cfg: ModelConfig, params: dict, qtype=Q.F32, raw: dict | None = None,
           arch: str | None = None, meta=None, extra: dict | None = None, drop=()) -> Path:
    """Write a GGUF the way llama.cpp does; 2-D weights get ``qtype``; ``raw`` maps a GGUF
    name to (bytes array, type) written as is."""
    arch = arch or cfg.family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    if cfg.family == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.family == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_chat_template("{{ messages }}")
    for key, value in (meta or {}).items():
        value(w) if callable(value) else w.add_uint32(key, value)
    for hf, a in params.items():
        name = _gguf_name(cfg.family, hf)
        if name in drop:
            continue
        if raw and name in raw:
            data, t = raw[name]
            w.add_tensor(name, data, raw_dtype=t)
            continue
        a = _to_gguf(cfg, hf, a)
        if a.ndim == 2 and qtype != Q.F32:
            q = quantize(a, qtype)
            w.add_tensor(name, q, raw_dtype=qtype if q.dtype == np.uint8 else None)
        else:
            w.add_tensor(name, a)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _roundtrip_ref(w: np.ndarray, qtype) -> np.ndarray:
    """Quantization is row-wise, so it commutes with llama.cpp's row permutation."""
    if w.ndim != 2 or qtype == Q.F32:
        return w
    return dequantize(quantize(w, qtype), qtype).reshape(w.shape)


# --- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_f32_roundtrip_is_exact(tmp_path, family):
    cfg = TINY_CFG[family]
    params = _random_params(cfg)
    ck = read_gguf(_write(tmp_path / f"{family}.gguf", cfg, params))
    assert ck.config == cfg
    assert set(ck.params) == set(params)
    for k, v in params.items():
        got = ck.params[k]
        assert got.dtype == np.float32 and got.shape == v.shape, k
        tol = 1e-6 if family == "gemma3" and k.endswith("norm.weight") else 0  # (w+1)-1
        np.testing.assert_allclose(got, v, rtol=0, atol=tol, err_msg=k)
    assert "lm_head.weight" not in ck.params and ck.config.tie_embeddings


def test_llama_qk_rows_are_unpermuted(tmp_path):
    cfg = TINY_CFG["llama"]
    params = _random_params(cfg)
    ck = read_gguf(_write(tmp_path / "m.gguf", cfg, params))
    q = "model.layers.1.self_attn.q_proj.weight"
    k = "model.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(ck.params[q], params[q])
    np.testing.assert_array_equal(ck.params[k], params[k])
    # and the file really held permuted rows (a no-op reader would fail the above)
    assert not np.array_equal(_permute(params[k], cfg.num_kv_heads), params[k])


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_llama_untied(tmp_path, qtype):
    cfg = TINY_CFG["llama"].replace(tie_embeddings=False)
    params = _random_params(cfg, seed=1)
    ck = read_gguf(_write(tmp_path / "m.gguf", cfg, params, qtype=qtype))
    assert ck.config == cfg and "lm_head.weight" in ck.params
    for k, v in params.items():
        np.testing.assert_array_equal(ck.params[k], _roundtrip_ref(v, qtype), err_msg=k)
        assert ck.quant_types[k] == (qtype.name if v.ndim == 2 else "F32")


# byte offsets of the float16 scale fields in one block of each K-quant
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


@pytest.mark.parametrize("qtype", list(_K_SCALES))
def test_k_quants_dequantize_in_hf_layout(tmp_path, qtype):
    """gguf cannot quantize K-quants, so write random blocks with sane scales."""
    cfg = TINY_CFG["llama"]
    params = _random_params(cfg)
    rng = np.random.default_rng(2)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw, ref = {}, {}
    for hf in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        rows, cols = params[hf].shape
        data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for off in _K_SCALES[qtype]:
            data[..., off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        data = data.reshape(rows, -1)
        raw[_gguf_name("llama", hf)] = (data, qtype)
        ref[hf] = dequantize(data, qtype)
    ck = read_gguf(_write(tmp_path / "m.gguf", cfg, params, raw=raw))
    for hf, v in ref.items():
        assert ck.params[hf].shape == params[hf].shape
        np.testing.assert_array_equal(ck.params[hf], v)
        assert ck.quant_types[hf] == qtype.name


def test_gemma3_metadata_and_sliding_pattern(tmp_path):
    cfg = TINY_CFG["gemma3"].replace(num_layers=4, layer_types=(
        "sliding_attention", "full_attention", "full_attention", "sliding_attention"))
    params = _random_params(cfg)
    pattern = [t == "sliding_attention" for t in cfg.layer_types]
    meta = {"p": lambda w: w.add_sliding_window_pattern(pattern),
            "swa": lambda w: w.add_float32("gemma3.rope.freq_base_swa", 5000.0)}
    ck = read_gguf(_write(tmp_path / "g.gguf", cfg, params, meta=meta))
    assert ck.config == cfg.replace(rope_local_theta=5000.0)
    # without the pattern key llama.cpp's fixed "every 6th layer is global" applies
    ck = read_gguf(_write(tmp_path / "g6.gguf", cfg, params))
    assert ck.config.layer_types == ("sliding_attention",) * 4
    assert ck.config.query_pre_attn_scalar == cfg.head_dim


def test_gpt2_untied_head_is_kept(tmp_path):
    cfg = TINY_CFG["gpt2"].replace(tie_embeddings=False)
    params = _random_params(cfg)
    ck = read_gguf(_write(tmp_path / "g.gguf", cfg, params))
    assert not ck.config.tie_embeddings
    np.testing.assert_array_equal(ck.params["lm_head.weight"], params["lm_head.weight"])


def test_gpt2_copied_head_means_tied(tmp_path):
    """llama.cpp writes GPT-2's output.weight as a copy of token_embd."""
    cfg = TINY_CFG["gpt2"]
    params = _random_params(cfg)
    ck = read_gguf(_write(tmp_path / "g.gguf", cfg, params,
                          extra={"output.weight": params["transformer.wte.weight"]}))
    assert ck.config.tie_embeddings and "lm_head.weight" not in ck.params


def test_metadata_plain_and_big_arrays_lazy(tmp_path):
    cfg = TINY_CFG["llama"].replace(vocab_size=2048)
    ck = read_gguf(_write(tmp_path / "m.gguf", cfg, _random_params(cfg)))
    assert ck.metadata["general.architecture"] == "llama"
    assert ck.metadata["llama.block_count"] == 2
    assert ck.metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert "tokenizer.ggml.tokens" not in ck.metadata
    assert ck.read_array("tokenizer.ggml.tokens")[:2] == ["t0", "t1"]
    assert ck.read_array("llama.block_count") == 2
    with pytest.raises(CheckpointError, match="no metadata key 'tokenizer.ggml.scores'"):
        ck.read_array("tokenizer.ggml.scores")
    assert ck.path == tmp_path / "m.gguf"


@pytest.mark.parametrize("chunk_bytes", [1, 700, 5000])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q4_1])
def test_dequantizing_a_few_rows_at_a_time_changes_nothing(tmp_path, monkeypatch, qtype, chunk_bytes):
    """read_gguf hands gguf ``_CHUNK_BYTES`` worth of rows per call (here 1 to 18 rows, often
    with a shorter last call): the values equal dequantizing the whole tensor at once."""
    cfg = TINY_CFG["llama"].replace(tie_embeddings=False)
    params = _random_params(cfg, seed=3)
    path = _write(tmp_path / "m.gguf", cfg, params, qtype=qtype)
    monkeypatch.setattr(gguf_reader, "_CHUNK_BYTES", chunk_bytes)
    ck = read_gguf(path)
    for k, v in params.items():
        got = ck.params[k]
        np.testing.assert_array_equal(got, _roundtrip_ref(v, qtype), err_msg=k)
        assert got.flags.c_contiguous and got.flags.writeable, k  # a copy, not the read-only map


# --- the header parser -----------------------------------------------------------------------
def test_header_parser_reads_what_gguf_reader_reads(tmp_path):
    """parse_gguf (shared by read_gguf and the tokenizer) against gguf.GGUFReader: every value
    type, scalars and arrays, values and Python types alike; long arrays decoded on demand."""
    V = gguf.GGUFValueType
    scalars = {V.UINT8: 200, V.INT8: -5, V.UINT16: 60_000, V.INT16: -30_000, V.UINT32: 4_000_000_000,
               V.INT32: -2_000_000_000, V.UINT64: 2**63 + 5, V.INT64: -(2**62), V.FLOAT32: 0.1,
               V.FLOAT64: 0.1, V.BOOL: True, V.STRING: "héllo 🤗 \n"}
    big_strings = ["", " ", "▁a", "<0x0A>", "中文", "😀" * 5] * 300
    meta = {}
    for t, v in scalars.items():
        meta[f"s.{t.name}"] = lambda w, t=t, v=v: w.add_key_value(f"x.{t.name}", v, t)
        meta[f"a.{t.name}"] = lambda w, t=t, v=v: w.add_key_value(f"x.a_{t.name}", [v, v], V.ARRAY, t)
    meta["big_f32"] = lambda w: w.add_key_value("x.big_f32", [i / 7 for i in range(3000)], V.ARRAY, V.FLOAT32)
    meta["big_str"] = lambda w: w.add_array("x.big_str", big_strings)
    meta["nested"] = lambda w: w.add_array("x.nested", [[1, 2], [3]])
    cfg = TINY_CFG["gemma3"]
    path = _write(tmp_path / "m.gguf", cfg, _random_params(cfg), meta=meta)

    ours, theirs = parse_gguf(path), gguf.GGUFReader(path)
    assert set(ours.arrays) == {"x.big_f32", "x.big_str"}
    assert ours.read_array("x.big_str") == big_strings
    for key, f in theirs.fields.items():
        got = ours.read_array(key) if key in ours.arrays else ours.metadata[key]
        if key == "x.nested":  # GGUFReader flattens nested arrays; we keep them nested
            assert got == [[1, 2], [3]] and f.contents() == [1, 2, 3]
            continue
        assert repr(got) == repr(f.contents()), key  # same values and types (1 vs 1.0 vs True)
    assert list(ours.metadata) == [k for k in theirs.fields if k not in ours.arrays]
    assert [t.name for t in theirs.tensors] == list(ours.tensors)
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.ne, info.ggml_type, info.offset) == \
            (tuple(t.shape.tolist()), t.tensor_type, t.data_offset)
    # the tokenizer's view: everything inline, only the requested prefixes
    md = read_gguf_metadata(path, prefixes=("x.", "general."))
    assert md["x.big_str"] == big_strings and md["x.UINT64"] == 2**63 + 5
    assert md["general.architecture"] == "gemma3" and not any(k.startswith("gemma3.") for k in md)


def test_every_truncated_file_is_a_checkpoint_error(tmp_path):
    """A file cut anywhere in its header, or in its data, names the file; never an IndexError,
    struct.error or a silently short string."""
    cfg = TINY_CFG["gemma3"].replace(vocab_size=1100)  # a lazily read token array, too
    good = _write(tmp_path / "m.gguf", cfg, _random_params(cfg))
    data, data_start = good.read_bytes(), min(t.offset for t in parse_gguf(good).tensors.values())
    bad = tmp_path / "cut.gguf"
    for n in [*range(64), *range(64, data_start + 64, 97), len(data) - 1]:
        bad.write_bytes(data[:n])
        with pytest.raises(CheckpointError, match="cut.gguf"):
            read_gguf(bad)


# --- errors ----------------------------------------------------------------------------------
def test_truncated_data_names_file_and_tensor(tmp_path):
    cfg = TINY_CFG["llama"]
    good = _write(tmp_path / "m.gguf", cfg, _random_params(cfg))
    data = good.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="truncated") as e:
        read_gguf(bad)
    assert str(bad) in str(e.value) and "blk.1." in str(e.value)
    bad.write_bytes(data[:100])  # inside the key/value header
    with pytest.raises(CheckpointError, match="cut.gguf"):
        read_gguf(bad)


def test_not_gguf_and_missing_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="x.gguf"):
        read_gguf(p)
    with pytest.raises(CheckpointError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


def test_unknown_architecture(tmp_path):
    cfg = TINY_CFG["llama"]
    p = _write(tmp_path / "m.gguf", cfg, _random_params(cfg), arch="mamba")
    with pytest.raises(CheckpointError, match=r"m\.gguf.*architecture 'mamba'"):
        read_gguf(p)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    cfg = TINY_CFG["llama"]
    params = _random_params(cfg)
    p = _write(tmp_path / "a.gguf", cfg, params, drop=("blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"a\.gguf.*model\.layers\.1\.mlp\.down_proj"):
        read_gguf(p)
    p = _write(tmp_path / "b.gguf", cfg, params,
               extra={"rope_freqs.weight": np.ones(32, np.float32)})
    with pytest.raises(CheckpointError, match=r"b\.gguf.*unexpected tensor 'rope_freqs"):
        read_gguf(p)
    bad = cfg.replace(intermediate_size=256)  # metadata says 256, tensors are 512 wide
    p = _write(tmp_path / "c.gguf", bad, params)
    with pytest.raises(CheckpointError, match=r"c\.gguf.*'blk\.0\.ffn_(gate|up|down)"):
        read_gguf(p)


def test_unsupported_tensor_type(tmp_path):
    cfg = TINY_CFG["llama"]
    params = _random_params(cfg)
    raw = {"output_norm.weight": (np.ones(cfg.hidden_size, np.float64), None)}
    p = _write(tmp_path / "m.gguf", cfg, params, raw=raw)
    with pytest.raises(CheckpointError, match=r"m\.gguf.*'output_norm\.weight'.*F64"):
        read_gguf(p)
