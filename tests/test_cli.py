"""The command line: every sub-command is there and its --help runs, the two generate
commands share their options, the exporter is never a user's own ``export`` module, and
the exit codes follow the README's table."""

import argparse
import subprocess
import sys

import pytest

from mobiletune.cli import build_parser, main
from mobiletune.runtime.cli import build_parser as device_parser

DESKTOP = {"ppl", "generate", "train", "export", "device", "side", "fed", "convert", "assets"}
DEVICE = {"train", "side-train", "generate", "doctor", "kit"}


def choices(parser: argparse.ArgumentParser) -> dict:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_the_sub_commands_are_the_documented_ones():
    assert set(choices(build_parser())) == DESKTOP
    assert set(choices(device_parser())) == DEVICE


@pytest.mark.parametrize("cmd", sorted(DESKTOP - {"export", "device"}))
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: mobiletune {cmd}" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", sorted(DEVICE))
def test_device_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(["device", cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: mobiletune device {cmd}" in capsys.readouterr().out


def options(parser) -> dict:
    return {a.dest: (a.default, a.required) for a in parser._actions if a.option_strings}


def test_both_generate_commands_take_the_same_generation_options():
    desk, dev = options(choices(build_parser())["generate"]), options(choices(device_parser())["generate"])
    for name in ("prompt", "chat", "max_new_tokens", "temperature", "seed"):
        assert desk[name] == dev[name], name


def test_export_never_runs_a_users_export_module(tmp_path):
    """From a directory holding an ``export.py`` and an ``export/`` package, ``mobiletune
    export`` still runs the installed exporter."""
    (tmp_path / "export.py").write_text("raise SystemExit('the user export.py ran')\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "__init__.py").write_text("raise SystemExit('the user export/ ran')\n")
    for cmd in ([sys.executable, "-m", "mobiletune", "export", "--help"],
                [str((__import__("pathlib").Path(sys.executable).parent / "mobiletune")), "export",
                 "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "usage: mobiletune export" in r.stdout and "user export" not in r.stderr


def test_exit_codes(tmp_path, capsys):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    assert main(["convert", "--gguf", str(not_gguf), "--out", str(tmp_path / "o")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "mobiletune.assets", "frobnicate"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run([sys.executable, "-m", "mobiletune.assets", "status"], capture_output=True,
                       text=True, env={**__import__("os").environ, "MOBILETUNE_HOME": str(tmp_path)})
    assert r.returncode in (0, 1) and (r.returncode == 1) == ("missing" in r.stdout), r.stdout
    assert main(["device", "train", str(tmp_path / "nope"), "--data", "x", "--out",
                 str(tmp_path / "o")]) == 2
    assert "no such bundle directory" in capsys.readouterr().err
