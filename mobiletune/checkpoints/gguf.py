"""Read a llama.cpp GGUF file into Hugging Face-named float32 parameters and a ModelConfig.

``read_gguf(path)`` dequantizes every tensor (any type ``gguf.quants.dequantize`` knows:
F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, IQ*, ...), renames it to its Hugging
Face state-dict name and undoes what llama.cpp's ``convert_hf_to_gguf.py`` changed:

* ``llama``: Q/K rows were permuted (``LlamaModel.permute``) for llama.cpp's RoPE; we
  permute them back. ``qwen2`` and ``gemma3`` are not permuted by llama.cpp.
* ``gemma3``: every ``*norm.weight`` (incl. q/k norms) is stored as ``1 + w``; HF stores
  ``w`` and computes ``x * (1 + w)``, so we subtract 1.
* ``gpt2``: Conv1D weights (c_attn, c_proj, c_fc) were transposed to (out, in); we
  transpose them back to transformers' (in, out). llama.cpp also writes ``output.weight``
  as a copy of ``token_embd``; a byte-identical copy is treated as a tied head.

GGUF shapes are ggml ``ne`` order (fastest dimension first); ``GGUFReader`` already hands
out numpy-order data, so a (out, in) torch Linear weight comes back as (out, in).

Metadata: ``GGUFCheckpoint.metadata`` holds every key/value as plain Python values except
arrays longer than ``_MAX_INLINE_ARRAY`` entries (the tokenizer's tokens, scores,
token_type and merges), which are decoded on demand by ``GGUFCheckpoint.read_array(key)``
(the checkpoint keeps the file memory-mapped for that). ``config.vocab_size`` is the
embedding's row count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mobiletune.errors import CheckpointError
from mobiletune.models.config import ConfigError, ModelConfig

_MAX_INLINE_ARRAY = 1024
ARCHITECTURES = ("llama", "qwen2", "gemma3", "gpt2")

# GGUF name -> HF name. Block tensors use "{i}"; the suffix (.weight/.bias) is kept.
_GLOBAL = {
    "gpt2": {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
             "output_norm": "transformer.ln_f", "output": "lm_head"},
    "llama": {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"},
}
_BLOCK = {
    "gpt2": {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
             "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    "llama": {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"},
}
_BLOCK["gemma3"] = {**_BLOCK["llama"], "ffn_norm": "pre_feedforward_layernorm",
                    "post_attention_norm": "post_attention_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm",
                    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_BLOCK["qwen2"] = _BLOCK["llama"]
_GLOBAL["qwen2"] = _GLOBAL["gemma3"] = _GLOBAL["llama"]
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_HIDDEN_ACT = {"gpt2": "gelu_new", "llama": "silu", "qwen2": "silu",
               "gemma3": "gelu_pytorch_tanh"}


@dataclass
class GGUFCheckpoint:
    """A GGUF file read into HF-named float32 ``params`` (HF shapes) plus its ``config``."""
    config: ModelConfig
    params: dict[str, np.ndarray]
    metadata: dict[str, Any]
    path: Path
    quant_types: dict[str, str] = field(default_factory=dict)  # HF name -> GGML type name
    _arrays: dict = field(default_factory=dict, repr=False)     # big arrays, decoded lazily

    def read_array(self, key: str) -> list:
        """A metadata array left out of ``metadata`` for its size (e.g. tokenizer.ggml.tokens)."""
        if key in self.metadata:
            return self.metadata[key]
        if key not in self._arrays:
            raise CheckpointError(f"{self.path}: no metadata key {key!r}")
        return self._arrays[key].contents()


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Read ``path`` (a llama.cpp GGUF of a ``llama``/``qwen2``/``gemma3``/``gpt2`` model).

    Returns HF-named float32 params whose names and shapes equal what the config implies.
    Raises CheckpointError (naming the file and the tensor or key) for a missing, truncated
    or corrupt file, an unsupported architecture or tensor type, or a missing, unexpected
    or wrongly shaped tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    reader = _open(path)
    metadata, arrays = {}, {}
    for key, f in reader.fields.items():
        if f.types and f.types[0].name == "ARRAY" and len(f.data) > _MAX_INLINE_ARRAY:
            arrays[key] = f
        else:
            metadata[key] = f.contents()
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported architecture {arch!r} (key "
                              f"general.architecture); supported: {list(ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    tied_copy = (arch == "gpt2" and "output.weight" in tensors and "token_embd.weight" in tensors
                 and _same_bytes(tensors["output.weight"], tensors["token_embd.weight"]))
    if tied_copy:
        del tensors["output.weight"]
    config = _config(path, arch, metadata, tensors)

    expected = _expected_shapes(config)
    names = {}
    for name, t in tensors.items():
        hf = _hf_name(arch, name)
        if hf is None or hf not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for a {arch} model "
                                  f"(maps to {hf or 'no Hugging Face name'})")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        shape = shape[::-1] if hf.endswith(_CONV1D) else shape
        if shape != expected[hf]:
            raise CheckpointError(f"{path}: tensor {name!r} ({hf}) has shape {shape} but the "
                                  f"config implies {expected[hf]}")
        names[hf] = name
    missing = sorted(set(expected) - set(names))
    if missing:
        listed = ", ".join(f"{_gguf_name(arch, m)} ({m})" for m in missing[:5])
        raise CheckpointError(f"{path}: missing tensor(s) {listed}"
                              f"{' ...' if len(missing) > 5 else ''} for a {arch} model "
                              f"with {config.num_layers} layers")

    params, qtypes = {}, {}
    for hf, name in names.items():
        params[hf] = _convert(path, config, hf, tensors[name], expected[hf])
        qtypes[hf] = tensors[name].tensor_type.name
    return GGUFCheckpoint(config, params, metadata, path, qtypes, arrays)


# --- file access ---------------------------------------------------------------------------
def _open(path: Path):
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class _Reader(GGUFReader):
        def _build_tensors(self, start_offs, fields):  # name the tensor a truncation cuts
            for f in fields:
                _, name, _, dims, dtype, offset = f.parts
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(dtype[0]))]
                end = start_offs + int(offset[0]) + int(np.prod(dims)) * size // block
                if end > len(self.data):
                    raise CheckpointError(
                        f"{path}: truncated GGUF file: tensor {bytes(name).decode()!r} needs "
                        f"bytes up to {end}, the file has {len(self.data)}")
            super()._build_tensors(start_offs, fields)

    try:
        return _Reader(path, "r")
    except CheckpointError:
        raise
    except Exception as e:  # the reader raises ValueError/IndexError/KeyError on bad bytes
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt "
                              f"header): {type(e).__name__}: {e}") from None


def _same_bytes(a, b) -> bool:
    return a.tensor_type == b.tensor_type and a.n_bytes == b.n_bytes and np.array_equal(
        a.data.reshape(-1).view(np.uint8), b.data.reshape(-1).view(np.uint8))


def _hf_name(arch: str, name: str) -> str | None:
    stem, dot, suffix = name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in _GLOBAL[arch]:
        return f"{_GLOBAL[arch][parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK[arch]:
        root = "transformer.h" if arch == "gpt2" else "model.layers"
        return f"{root}.{int(parts[1])}.{_BLOCK[arch][parts[2]]}.{suffix}"
    return None


def _gguf_name(arch: str, hf: str) -> str:
    """The inverse of ``_hf_name`` (for error messages)."""
    stem, suffix = hf.rsplit(".", 1)
    for g, h in _GLOBAL[arch].items():
        if h == stem:
            return f"{g}.{suffix}"
    _, _, i, rest = stem.split(".", 3)
    return next(f"blk.{i}.{g}.{suffix}" for g, h in _BLOCK[arch].items() if h == rest)


def _convert(path: Path, cfg: ModelConfig, hf: str, t, shape: tuple) -> np.ndarray:
    """Dequantize one tensor to float32 in HF layout."""
    from gguf.quants import dequantize
    try:
        w = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {t.name!r} has GGML type "
                              f"{t.tensor_type.name}, which gguf cannot dequantize") from None
    w = np.array(w, dtype=np.float32)  # a copy: never a view into the memory-mapped file
    if hf.endswith(_CONV1D):
        w = np.ascontiguousarray(w.T)
    w = w.reshape(shape)
    if cfg.family == "llama" and hf.endswith(("q_proj.weight", "q_proj.bias",
                                              "k_proj.weight", "k_proj.bias")):
        w = _unpermute(w, cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads)
    if cfg.family == "gemma3" and hf.endswith("norm.weight"):
        w -= 1.0
    return w


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's ``LlamaModel.permute``: per head, llama.cpp stored the
    rows as interleaved (x0, x_half, x1, x_half+1, ...) pairs; restore HF's halves layout."""
    rest = w.shape[1:]
    return np.ascontiguousarray(
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


# --- config ----------------------------------------------------------------------------------
def _f32(x) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06. Undo that."""
    return float(str(np.float32(x)))


def _config(path: Path, arch: str, md: dict, tensors: dict) -> ModelConfig:
    def get(key, default: Any = KeyError):
        v = md.get(f"{arch}.{key}", default)
        if v is KeyError:
            raise CheckpointError(f"{path}: missing metadata key {arch}.{key}")
        if isinstance(v, list):  # per-layer values (e.g. head_count); we need them uniform
            if len(set(v)) != 1:
                raise CheckpointError(f"{path}: metadata {arch}.{key} varies per layer: {v}")
            v = v[0]
        return v

    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = get("attention.key_length", None)
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count", None)
    head_dim = int(head_dim or hidden // heads)
    n_layers = int(get("block_count"))
    eps = get("attention.layer_norm_epsilon" if arch == "gpt2"
              else "attention.layer_norm_rms_epsilon")
    kw: dict[str, Any] = dict(
        family=arch, vocab_size=int(tensors["token_embd.weight"].shape[1]),
        hidden_size=hidden, num_layers=n_layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        intermediate_size=int(get("feed_forward_length", 4 * hidden)),
        max_position=int(get("context_length")), norm_eps=_f32(eps),
        tie_embeddings="output.weight" not in tensors, hidden_act=_HIDDEN_ACT[arch],
        rope_theta=_f32(get("rope.freq_base", 1e6 if arch == "gemma3" else 10000.0)),
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=md.get("tokenizer.ggml.padding_token_id"))
    if arch == "gpt2":
        kw.update(attention_bias=True, mlp_bias=True)
    elif arch == "qwen2":
        kw.update(attention_bias=True)
    else:
        kw.update(attention_bias="blk.0.attn_q.bias" in tensors,
                  mlp_bias=arch == "llama" and "blk.0.ffn_up.bias" in tensors)
    scaling = get("rope.scaling.type", "none")
    factor = float(get("rope.scaling.factor", 1.0)) if scaling != "none" else 1.0
    if scaling not in ("none", "linear") or (factor != 1.0 and arch != "gemma3"):
        raise CheckpointError(f"{path}: metadata {arch}.rope.scaling.type={scaling!r} "
                              f"(factor {factor}) is not supported for {arch}")
    if arch == "gemma3":
        # llama.cpp hard-codes what the file does not say: every 6th layer global, local
        # RoPE base 10000, and queries scaled by head_dim ** -0.5 (hidden/heads for 27B).
        pattern = md.get(f"{arch}.attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):
            types = ["sliding_attention" if s else "full_attention" for s in pattern]
        else:
            types = ["full_attention" if pattern and (i + 1) % pattern == 0
                     else "sliding_attention" for i in range(n_layers)]
        kw.update(rope_scaling_factor=factor, layer_types=tuple(types),
                  rope_local_theta=_f32(get("rope.freq_base_swa", 10000.0)),
                  sliding_window=int(get("attention.sliding_window", 512)),
                  query_pre_attn_scalar=hidden // heads if n_layers == 62 else head_dim,
                  attn_logit_softcapping=get("attn_logit_softcapping", None),
                  final_logit_softcapping=get("final_logit_softcapping", None))
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise CheckpointError(f"{path}: metadata describes no valid model: {e}") from None


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes implied by ``cfg`` (private; see models.param_shapes)."""
    d, v, f, hd = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    out: dict[str, tuple[int, ...]] = {}
    if cfg.family == "gpt2":
        out.update({"transformer.wte.weight": (v, d), "transformer.wpe.weight":
                    (cfg.max_position, d), "transformer.ln_f.weight": (d,),
                    "transformer.ln_f.bias": (d,)})
        for i in range(cfg.num_layers):
            p = f"transformer.h.{i}."
            out.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                        p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                        p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                        p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                        p + "mlp.c_fc.weight": (d, f), p + "mlp.c_fc.bias": (f,),
                        p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,)})
    else:
        out.update({"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)})
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            out.update({p + "input_layernorm.weight": (d,), a + "q_proj.weight": (q, d),
                        a + "k_proj.weight": (kv, d), a + "v_proj.weight": (kv, d),
                        a + "o_proj.weight": (d, q), p + "post_attention_layernorm.weight": (d,),
                        m + "gate_proj.weight": (f, d), m + "up_proj.weight": (f, d),
                        m + "down_proj.weight": (d, f)})
            if cfg.attention_bias:
                out.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,),
                            a + "v_proj.bias": (kv,)})
                if cfg.family != "qwen2":
                    out[a + "o_proj.bias"] = (d,)
            if cfg.mlp_bias:
                out.update({m + "gate_proj.bias": (f,), m + "up_proj.bias": (f,),
                            m + "down_proj.bias": (d,)})
            if cfg.family == "gemma3":
                out.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,),
                            p + "pre_feedforward_layernorm.weight": (d,),
                            p + "post_feedforward_layernorm.weight": (d,)})
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, d)
    return out
