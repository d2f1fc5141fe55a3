"""The tokenizer both the desktop and the phone use.

This module runs on the phone: it imports only the standard library, ``tokenizers`` and
``jinja2`` (the latter only when a chat template is rendered). No jax, torch, transformers.

A :class:`Tokenizer` is a ``tokenizers.Tokenizer`` (the ``tokenizer.json`` model) plus the few
facts a ``tokenizer_config.json`` adds: the special tokens, whether the model expects a BOS
in front of every text, and the chat template. It is built from

* ``Tokenizer.from_file(tokenizer_json, config_json)`` / ``Tokenizer.from_dir(hf_dir)``,
* ``Tokenizer.from_gpt2_files(vocab_json, merges_txt)`` (byte-level BPE exactly like HF GPT-2),
* ``mobiletune.formats.gguf_tokenizer.tokenizer_from_gguf(path)`` (desktop only),

and written back with :meth:`Tokenizer.save` as a ``tokenizer.json`` + ``tokenizer_config.json``
pair that both this class and ``transformers.AutoTokenizer`` load.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_str(value: Any) -> str | None:
    """A special token as written in a tokenizer_config.json: a string, an AddedToken dict or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MobiletuneError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MobiletuneError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise MobiletuneError(f"{what} {path} must hold a JSON object")
    return data


class Tokenizer:
    """Text <-> token ids for one model, plus its special tokens and chat template.

    ``config`` holds tokenizer_config.json keys; the ones read here are ``bos_token``,
    ``eos_token``, ``pad_token``, ``unk_token`` (strings or AddedToken dicts),
    ``add_bos_token`` and ``chat_template``. Unknown keys are kept and written back by ``save``.
    """

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None):
        self.backend = backend
        self.config = dict(config or {})
        template = self.config.get("chat_template")
        if isinstance(template, list):  # HF allows [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            self.config["chat_template"] = named.get("default")
        if _token_str(self.config.get("bos_token")) is None:
            inferred = self._prefix_added_by_post_processor()
            if inferred is not None:
                self.config["bos_token"] = inferred
        if not isinstance(self.config.get("add_bos_token"), bool):
            self.config["add_bos_token"] = self._prefix_added_by_post_processor() is not None

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, config_json: str | os.PathLike | None = None
                  ) -> "Tokenizer":
        """A ``tokenizer.json`` and, optionally, its ``tokenizer_config.json``."""
        path = Path(tokenizer_json)
        if not path.is_file():
            raise MobiletuneError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise MobiletuneError(f"cannot read tokenizer {path}: {e}") from None
        config = _read_json(Path(config_json), "tokenizer config") if config_json else {}
        return cls(backend, config)

    @classmethod
    def from_dir(cls, hf_dir: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face tokenizer directory: ``tokenizer.json`` (preferred) or GPT-2 style
        ``vocab.json`` + ``merges.txt``, with ``tokenizer_config.json`` and a separate
        ``chat_template.jinja`` when present."""
        d = Path(hf_dir)
        cfg_path = d / "tokenizer_config.json"
        if (d / "tokenizer.json").is_file():
            tok = cls.from_file(d / "tokenizer.json", cfg_path if cfg_path.is_file() else None)
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            tok = cls.from_gpt2_files(d / "vocab.json", d / "merges.txt")
            if cfg_path.is_file():
                tok = cls(tok.backend, {**tok.config, **_read_json(cfg_path, "tokenizer config")})
        else:
            raise MobiletuneError(f"no tokenizer in {d}: expected tokenizer.json, "
                                  "or vocab.json + merges.txt")
        jinja = d / "chat_template.jinja"
        if jinja.is_file() and not tok.chat_template:
            tok.config["chat_template"] = jinja.read_text(encoding="utf-8")
        return tok

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike
                        ) -> "Tokenizer":
        """Byte-level BPE built exactly like HF GPT-2 (``"Hello world"`` -> ``[15496, 995]``)."""
        for p in (vocab_json, merges_txt):
            if not Path(p).is_file():
                raise MobiletuneError(f"GPT-2 tokenizer file not found: {p}")
        bpe = models.BPE.from_file(str(vocab_json), str(merges_txt))
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        eot = "<|endoftext|>"
        if backend.token_to_id(eot) is not None:
            backend.add_special_tokens([AddedToken(eot, special=True, normalized=True)])
            config = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
        else:
            config = {}
        return cls(backend, {**config, "add_bos_token": False})

    # ---- special tokens -----------------------------------------------------------------
    def _prefix_added_by_post_processor(self) -> str | None:
        """The token the post-processor puts in front of a text (e.g. Gemma's ``<bos>``)."""
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
            return self.backend.id_to_token(full[0])
        return None

    def _special_id(self, key: str) -> int | None:
        token = _token_str(self.config.get(key))
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def adds_bos(self) -> bool:
        """Whether the model's own tokenizer puts BOS in front of a text (Gemma: yes;
        GPT-2, Qwen, SmolLM2: no). ``encode(..., add_special_tokens=True)`` follows it."""
        return bool(self.config.get("add_bos_token")) and self.bos_id is not None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (may exceed the
        model's embedding rows, e.g. the Gemma 3 tokenizer.json's ``<image_soft_token>``)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        return template if isinstance(template, str) and template else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ---- encode / decode ----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text (``<|im_start|>``) are
        matched whole. With ``add_special_tokens`` a BOS is prepended when ``adds_bos``;
        nothing else is ever added (no EOS)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.adds_bos:
            ids.insert(0, self.bos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """``[encode(t) for t in texts]``, run in parallel by the tokenizers library."""
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_special_tokens and self.adds_bos:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat template ------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render the checkpoint's Jinja chat template the way ``transformers`` does
        (``apply_chat_template(..., tokenize=False)``): a sandboxed environment with
        ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson``
        that does not escape HTML, and the special tokens (``bos_token``...) as variables.
        Extra keyword arguments (``tools``, ``documents``, ``enable_thinking``...) reach the
        template. The string already contains any BOS the template writes: encode it with
        ``add_special_tokens=False``."""
        template = self.chat_template
        if template is None:
            raise MobiletuneError("this tokenizer has no chat template (a base model?): format "
                                  "the prompt yourself or use an instruction-tuned checkpoint")
        import jinja2  # imported here: plain encoding on the phone does not need it

        try:
            compiled = _compile_template(template)
            variables = {key: _token_str(self.config.get(key)) for key in SPECIAL_KEYS}
            variables.update(tools=None, documents=None)
            variables.update(kwargs)
            return compiled.render(messages=[dict(m) for m in messages],
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise MobiletuneError(f"chat template failed: {e}") from None

    # ---- save ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, add_bos_token,
        chat_template) into ``directory``, each atomically. Loadable by :meth:`from_dir` and by
        ``transformers.AutoTokenizer.from_pretrained``. Returns the directory."""
        d = Path(directory)
        config = dict(self.config)
        config.update({key: _token_str(config.get(key)) for key in SPECIAL_KEYS})
        config["add_bos_token"] = self.adds_bos
        config.setdefault("add_eos_token", False)
        config.setdefault("clean_up_tokenization_spaces", False)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.pop("added_tokens_decoder", None)  # tokenizer.json's added_tokens are the truth
        atomic.write_text(d / "tokenizer.json", self.backend.to_str())
        atomic.write_text(d / "tokenizer_config.json",
                           json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return d

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, adds_bos={self.adds_bos})")


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(source: str):
    """Compile a chat template in the environment transformers uses (cached per source)."""
    if source in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[source]
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): render the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = env.from_string(source)
    _TEMPLATE_CACHE[source] = compiled
    return compiled
