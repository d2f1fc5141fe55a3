"""``FamilySpec``: everything the code needs to know about a model family except its math.

A spec is data plus a few small functions of a ``ModelConfig``: the parameter names and
shapes (Hugging Face's), where the layers are, which tensors are the embedding, positions,
final norm and head, the PEFT and weight-decay conventions, how a Hugging Face
``config.json`` and a GGUF file map onto ``ModelConfig``, and the named presets. The math
(``embed``, ``block``, ``final_norm``, ``output_weight``, ``init_layer``) lives in the module
named by ``math``, imported only where JAX is.

Standard library only: the phone-side runtime and the GGUF reader import this package, and
``tests/test_families.py`` checks that it pulls in neither JAX nor numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mobiletune.families.config import ModelConfig

Shapes = dict[str, tuple[int, ...]]


def _no_embed_scale(cfg: ModelConfig) -> float | None:
    return None


def _no_gguf_extras(meta: Any, kw: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Preset:
    """A named model shape (``preset("gemma3-270m", num_layers=2)``)."""
    config: Mapping[str, Any]   # ModelConfig keyword arguments (the registry adds ``family``)
    tokenizer: str              # the asset with its real tokenizer: a model GGUF or tokenizer files


@dataclass(frozen=True, eq=False)
class GGUFSpec:
    """How llama.cpp's ``convert_hf_to_gguf.py`` stores the family, for the GGUF reader.

    The global tensors use llama.cpp's names for every architecture (``token_embd``,
    ``position_embd``, ``output_norm``, ``output``); the reader maps them onto the spec's
    ``embed``, ``positions``, ``final_norm`` and ``head``. ``blocks`` names the rest.

    ``config(meta, kw)`` gets the reader's view of the metadata (``meta.get(key, default)``,
    ``meta.f32(key, default)`` for a float stored as float32, ``meta.raw(key, default)``
    keeping per-layer lists, all for keys after ``<arch>.``; ``meta.tensors``: GGUF name ->
    ggml shape) and the keyword arguments read so far."""
    arch: str                              # general.architecture; also the metadata key prefix
    blocks: Mapping[str, str]              # GGUF ``blk.N.<stem>`` -> HF layer-relative module
    eps_key: str                           # metadata key (after "<arch>.") of the norm epsilon
    head_dim_keys: tuple[str, ...] = ("attention.key_length",)  # tried in order, else D / heads
    rope_base: float = 10000.0             # RoPE base when the file has no rope.freq_base
    permuted: Mapping[str, str] = field(default_factory=dict)  # module -> ModelConfig head-count
    #                                        field; llama.cpp permuted its rows for its RoPE
    norm_shift: float = 0.0                # every ``*norm.weight`` was stored as w + norm_shift
    head_may_copy_embed: bool = False      # ``output.weight`` may be a byte copy of token_embd (tied)
    config: Callable[[Any, dict], dict] = _no_gguf_extras  # (metadata view, common kwargs) ->
    #                                        the family's further ModelConfig kwargs


@dataclass(frozen=True, eq=False)
class FamilySpec:
    """One model family (see the module docstring). Names are Hugging Face state-dict names;
    ``*_modules`` and ``layer_shapes`` keys are relative to a layer (``attn.c_attn``)."""
    name: str                                   # ModelConfig.family: "gpt2", "llama", ...
    hf_model_types: tuple[str, ...]             # config.json model_types read as this family;
    #                                             the first is the one we write
    hf_architecture: str                        # config.json "architectures" entry we write
    math: str                                   # module of the math, imported lazily by models
    layer_prefix: str                           # layer i's name prefix: "model.layers.{i}."
    layer_shapes: Callable[[ModelConfig], Shapes]  # one layer: relative name -> shape
    embed: str                                  # token embedding (V, D)
    final_norm: tuple[str, ...]                 # the final norm's parameters, (D,) each
    hidden_act: str                             # activation when a config names none (GGUF never does)
    from_hf: Callable[[dict], ModelConfig]      # config.json dict -> config (KeyError if incomplete)
    to_hf: Callable[[ModelConfig], dict]        # config -> config.json keys (model_type and
    #                                             architectures are added from the fields above)
    peft_default_targets: tuple[str, ...]       # PEFT's default LoRA target_modules
    no_decay_markers: tuple[str, ...]           # names containing one get no weight decay
    positions: str | None = None                # learned position embedding (max_position, D)
    head: str = "lm_head.weight"                # untied output head (V, D)
    embed_scale: Callable[[ModelConfig], float | None] = _no_embed_scale  # embedding multiplier
    conv1d_modules: tuple[str, ...] = ()        # Conv1D modules: weight stored (in, out)
    attention_kind: Callable[[ModelConfig, int], tuple] | None = None  # layer i -> (RoPE base,
    #                                             RoPE factor, window or None); None: all alike
    linear_rope_scaling: bool = False           # the math applies cfg.rope_scaling_factor
    presets: Mapping[str, Preset] = field(default_factory=dict)  # preset name -> Preset
    gguf: GGUFSpec | None = None                # None: no GGUF support

    def prefix(self, i: int) -> str:
        """Layer ``i``'s name prefix, e.g. ``model.layers.3.``."""
        return self.layer_prefix.format(i=i)

    def param_shapes(self, cfg: ModelConfig) -> Shapes:
        """HF name -> shape for every parameter of the model (a tied head has none)."""
        d = cfg.hidden_size
        s: Shapes = {self.embed: (cfg.vocab_size, d)}
        if self.positions is not None:
            s[self.positions] = (cfg.max_position, d)
        s.update({n: (d,) for n in self.final_norm})
        layer = self.layer_shapes(cfg)
        for i in range(cfg.num_layers):
            p = self.prefix(i)
            s.update({p + k: v for k, v in layer.items()})
        if not cfg.tie_embeddings:
            s[self.head] = (cfg.vocab_size, d)
        return s

    def output_name(self, cfg: ModelConfig) -> str:
        """The name of the (V, D) unembedding: the embedding when tied, else the head."""
        return self.embed if cfg.tie_embeddings else self.head

    def is_conv1d(self, module: str) -> bool:
        """Whether ``module`` (a full or layer-relative module name) is a Conv1D."""
        return any(module == m or module.endswith("." + m) for m in self.conv1d_modules)

    def no_decay(self, name: str) -> bool:
        """Whether the parameter ``name`` is spared weight decay (norms, biases, embeddings)."""
        return any(m in name for m in self.no_decay_markers)
