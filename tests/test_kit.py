"""The phone kit's requirement lists, read from a wheel's METADATA (no network: the kit
itself is built and installed on arm64 in ``tests/test_arm64.py``)."""

import zipfile
from pathlib import Path

import pytest

from mobiletune.runtime.kit import KitError, fed_requirements, runtime_requirements
from tests.fed_helpers import flower_pin


def wheel(tmp_path, requires) -> Path:
    p = tmp_path / "mobiletune-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("mobiletune-0.1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: mobiletune\n"
                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return p


def test_the_fed_kit_takes_pyprojects_flower_pin_without_the_simulation_engine(tmp_path):
    pin = flower_pin()
    w = wheel(tmp_path, ["numpy>=1.26", 'ai-edge-litert==2.3.0; extra == "runtime"',
                         'jax==0.10.2; extra == "train"', 'mobiletune[runtime]; extra == "fed"',
                         f'flwr[simulation]=={pin}; extra == "fed"'])
    assert runtime_requirements(w) == ["ai-edge-litert==2.3.0", "numpy>=1.26"]
    assert fed_requirements(w) == [f"flwr=={pin}"]


def test_a_wheel_without_a_pinned_flower_is_refused_by_name(tmp_path):
    w = wheel(tmp_path, ['numpy>=1.26', 'flwr>=1.20; extra == "fed"'])
    with pytest.raises(KitError, match=r"mobiletune-0\.1\.0-py3-none-any\.whl: its fed extra should pin"):
        fed_requirements(w)
    with pytest.raises(KitError, match="not a readable wheel"):
        fed_requirements(tmp_path / "missing.whl")
