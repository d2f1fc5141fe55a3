"""--help tells the truth for every command, including the pass-through ones."""

import subprocess
import sys

import pytest

from mobiletune.cli import main

COMMANDS = ["ppl", "generate", "train", "convert", "assets"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: mobiletune {cmd}" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS + ["export", "device"])


def test_device_help_is_the_runtime_cli(capsys):
    with pytest.raises(SystemExit) as e:
        main(["device", "train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mobiletune device train" in out and "--battery" in out and "trace:FILE" in out


def test_export_help_runs_the_exporter():
    r = subprocess.run([sys.executable, "-m", "mobiletune", "export", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "usage: mobiletune export" in r.stdout and "--variants" in r.stdout
