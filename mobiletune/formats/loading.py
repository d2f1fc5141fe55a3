"""Resolve what a user types (`--model`, `--text`) into configs, params, tokenizers, text.

`--model` accepts an HF directory, a ``.gguf`` file, or an asset name (``smollm2-135m``,
``gemma3-270m``); `--text` accepts a file or an asset spec (``botchan``,
``shakespeare:hamlet``). Nothing here downloads anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mobiletune import assets, families
from mobiletune.errors import DataError, MobiletuneError
from mobiletune.models.config import ModelConfig


@dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict            # HF name -> float32 numpy array
    tokenizer: object       # mobiletune.runtime.tokenizer.Tokenizer
    source: str


def resolve_model_path(spec: str) -> Path:
    p = Path(spec).expanduser()
    if p.exists():
        return p
    if spec in assets.MODEL_ASSETS:
        return Path(assets.model_path(spec))
    raise MobiletuneError(f"--model {spec!r}: no such file or directory, and not an asset name "
                          f"(assets: {', '.join(sorted(assets.MODEL_ASSETS))})")


def preset_tokenizer(name: str):
    """The real tokenizer of the preset ``name`` (its spec's ``Preset.tokenizer`` asset)."""
    from mobiletune.runtime.tokenizer import Tokenizer
    if name not in families.PRESETS:
        raise MobiletuneError(f"no tokenizer asset for preset {name!r}")
    tok = families.PRESETS[name].tokenizer
    if tok in assets.MODEL_ASSETS:
        return gguf_tokenizer(Path(assets.model_path(tok)))
    files = assets.tokenizer_files(tok)
    if "merges.txt" in files:
        return Tokenizer.from_gpt2_files(files["vocab.json"], files["merges.txt"])
    return Tokenizer.from_file(files["tokenizer.json"], files.get("tokenizer_config.json"))


def peek_config(spec: str) -> ModelConfig | None:
    """The model config without loading weights, where that is cheap (presets, HF dirs)."""
    if spec.startswith("preset:"):
        from mobiletune.models.config import preset
        return preset(spec.split(":", 1)[1])
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return ModelConfig.from_hf_config(p / "config.json")
    return None


def load_model(spec: str, seed: int = 0) -> LoadedModel:
    """``preset:<name>`` gives a randomly initialised model of a preset's real shape (seeded),
    with that family's real tokenizer — for full fine-tuning from scratch and smoke runs."""
    if spec.startswith("preset:"):
        import jax

        from mobiletune.models import init_params
        from mobiletune.models.config import preset
        name = spec.split(":", 1)[1]
        cfg = preset(name)
        params = init_params(cfg, jax.random.PRNGKey(seed), as_numpy=True)
        return LoadedModel(cfg, params, preset_tokenizer(name), spec)
    path = resolve_model_path(spec)
    if path.is_dir():
        from mobiletune.formats.hf import load_hf_dir
        from mobiletune.runtime.tokenizer import Tokenizer
        cfg, params = load_hf_dir(path)
        return LoadedModel(cfg, params, Tokenizer.from_dir(path), str(path))
    if path.suffix == ".gguf":
        from mobiletune.formats.gguf import read_gguf
        ck = read_gguf(path)
        return LoadedModel(ck.config, ck.params, gguf_tokenizer(path), str(path))
    raise MobiletuneError(f"--model {spec!r}: expected a Hugging Face directory or a .gguf file")


GGUF_TOKENIZER_CACHE_VERSION = 2  # bump when what we build from a GGUF changes


def gguf_tokenizer(path: Path):
    """The tokenizer stored in a GGUF, built once and cached as tokenizer.json beside the
    other assets (building Gemma's 262k-piece BPE takes a while)."""
    from mobiletune.formats.gguf_tokenizer import tokenizer_from_gguf
    from mobiletune.runtime.tokenizer import Tokenizer
    st = path.stat()
    cache = (assets.cache_dir() / "gguf-tokenizers"
             / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}-v{GGUF_TOKENIZER_CACHE_VERSION}")
    if (cache / "tokenizer.json").exists():
        return Tokenizer.from_dir(cache)
    tok = tokenizer_from_gguf(path)
    if tok.chat_template is None and path.name.startswith("gemma-3"):
        # The Gemma 3 base GGUF carries no chat template; Gemma 3's own (the one in every
        # google/gemma-3-* tokenizer_config.json) ships with the Gemma tokenizer asset.
        try:
            conf = assets.tokenizer_files("gemma3")["tokenizer_config.json"]
            import json
            tok.config["chat_template"] = json.loads(conf.read_text("utf-8"))["chat_template"]
        except (MobiletuneError, KeyError, ValueError):
            pass
    tok.save(cache)
    return tok


def read_text(spec: str) -> str:
    """The text of a file or asset spec (see ``assets.read_text``): strict UTF-8 (an error
    names the file and byte offset), a leading BOM dropped, bytes otherwise unchanged."""
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            raise DataError(f"{p}: is a directory, expected a text file")
        from mobiletune.runtime.data import read_text_file
        text = read_text_file(p)
    elif ":" in spec or spec in assets.TEXT_ASSETS:
        text = assets.read_text(spec)
    else:
        raise DataError(f"--text {spec!r}: no such file, and not an asset spec "
                        f"(e.g. botchan, shakespeare:hamlet)")
    if not text.strip():
        raise DataError(f"{spec}: the text is empty")
    return text
