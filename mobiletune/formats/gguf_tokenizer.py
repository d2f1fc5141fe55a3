"""Build the model's tokenizer from a GGUF file's ``tokenizer.*`` metadata.

``tokenizer_from_gguf(path) -> Tokenizer`` (see :mod:`mobiletune.runtime.tokenizer`).

Supported ``tokenizer.ggml.model`` values:

``gpt2``   byte-level BPE with the file's merges (SmolLM2, Qwen, Llama 3). The pre-tokenizer
           comes from ``tokenizer.ggml.pre``: ``smollm`` isolates every digit before the GPT-2
           regex, as llama.cpp and SmolLM2's own tokenizer.json do (transformers' GGUF loader
           skips that step; the two agree unless whitespace precedes a digit, see the tests).
``llama``  SentencePiece BPE with byte fallback (Gemma 3). The file has no merges, so they are
           rebuilt from the vocabulary like transformers' ``generate_merges``: every split of a
           piece into two pieces, ranked by the piece's score. llama.cpp writes -1000 as the
           score of control and user-defined pieces, where the SentencePiece model has 0; with
           0 restored the merge list equals HF's Gemma 3 tokenizer.json exactly. Pieces made of
           spaces are stored with real spaces and are respelled with U+2581.

Reading: the key/value section is read with ``formats.gguf.parse_gguf``, which decodes the
vocabulary arrays in bulk (``gguf.GGUFReader`` makes a numpy view per element, which is
slow for Gemma's 262,144 pieces; measured: benchmarks/README.md).

Building Gemma's takes seconds (mostly deriving its 514,906 merges); nothing is cached here
(``formats.loading.gguf_tokenizer`` saves it once and reads it back with
``Tokenizer.from_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from mobiletune.errors import CheckpointError
from mobiletune.formats.gguf import parse_gguf
from mobiletune.runtime.tokenizer import Tokenizer

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp llama_token_type)


# ---- metadata reading -------------------------------------------------------------------
def read_gguf_metadata(path: str | os.PathLike, prefixes: tuple[str, ...] = ("tokenizer.", "general.")
                       ) -> dict[str, Any]:
    """The GGUF key/value metadata whose keys start with one of ``prefixes``; arrays become
    Python lists (strings decoded as UTF-8). Maps the file and touches only the header."""
    metadata = parse_gguf(path, lazy_above=None, tensors=False).metadata
    return {k: v for k, v in metadata.items() if k.startswith(prefixes)}


# ---- builders ---------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str | None):
    """llama.cpp's pre-tokenizer ``tokenizer.ggml.pre`` as a tokenizers pre-tokenizer."""
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2"):
        return gpt2
    if pre in ("smollm", "starcoder", "refact"):  # "\p{N}" first, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
             "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported "
                              "(supported: default, gpt2, smollm, llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=False)])


def _build_gpt2(md: dict) -> tuple[tokenizers.Tokenizer, list[str], set[int]]:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
              for t in md["tokenizer.ggml.tokens"]]
    merges = []
    for m in md.get("tokenizer.ggml.merges") or ():
        left, right = m.split(" ")
        merges.append((left, right))
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, merges, dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(md.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel: not added.
    raw = md["tokenizer.ggml.tokens"]
    return backend, tokens, {i for i, t in enumerate(raw) if not set(t) <= alphabet}


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best piece first (transformers' generate_merges
    with vocab_scores: sort by (score, len(left), len(right)) descending, stable)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _build_sentencepiece(md: dict) -> tuple[tokenizers.Tokenizer, list[str], set[int]]:
    if md.get("tokenizer.ggml.add_space_prefix", True):
        raise CheckpointError("GGUF SentencePiece tokenizers with add_space_prefix (Llama 2 style) "
                              "are not supported; Gemma-style files (add_space_prefix=false) are")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(md["tokenizer.ggml.tokens"])
    tokens = [t.replace(" ", "\u2581") if " " in t and not t.strip() else t
              for t in md["tokenizer.ggml.tokens"]]
    scores = [0.0 if ty in (CONTROL, USER_DEFINED) else float(s)
              for s, ty in zip(md["tokenizer.ggml.scores"], types)]
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, _merges_from_scores(tokens, scores),
                     dropout=None, unk_token=tokens[unk_id] if unk_id is not None else None,
                     fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
    return backend, tokens, set()


_BUILDERS = {"gpt2": _build_gpt2, "llama": _build_sentencepiece}


def tokenizer_from_gguf(path) -> Tokenizer:
    """The tokenizer a GGUF file describes: vocabulary, merges, added/special tokens,
    bos/eos/pad/unk, ``add_bos_token`` (``tokenizer.ggml.add_bos_token``) and the chat template
    (``tokenizer.chat_template``, absent in base models)."""
    if not Path(path).is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    md = read_gguf_metadata(path)
    kind = md.get("tokenizer.ggml.model")
    if kind not in _BUILDERS or "tokenizer.ggml.tokens" not in md:
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported "
                              f"(supported: {', '.join(_BUILDERS)})")
    backend, spelled, not_added = _BUILDERS[kind](md)

    # Control tokens are special; user-defined ones (Gemma's "\n\n", "<think>") are plain
    # added tokens. Both are matched whole in the raw text, as llama.cpp does.
    types = md.get("tokenizer.ggml.token_type") or ()
    added = [AddedToken(spelled[i], special=ty == CONTROL, normalized=False)
             for i, ty in enumerate(types) if ty in (CONTROL, USER_DEFINED) and i not in not_added]
    backend.add_tokens(added)

    tokens = md["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token"),
                      ("unknown", "unk_token")):
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        config[name] = spelled[token_id] if token_id is not None and token_id < len(tokens) else None
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and config["bos_token"]:
        bos = config["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, backend.token_to_id(bos))])
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = bool(md.get("tokenizer.ggml.add_eos_token", False))
    config["chat_template"] = md.get("tokenizer.chat_template")
    return Tokenizer(backend, config)
