"""Damaged bundles end in one clear error naming the key or file: never a traceback, never
accepted silently. Every key of the manifest (recursively, the first item of each list)
is removed and, separately, given a value of the wrong type; every file is removed,
truncated, and has its header bytes flipped — for a monolithic and a sharded bundle."""

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

from mobiletune.errors import MobiletuneError  # noqa: E402
from mobiletune.runtime import bundle as B  # noqa: E402
from mobiletune.runtime.runner import open_bundle  # noqa: E402

# Records kept for people and the desktop, which the phone never reads: their inner keys
# are free-form (the objects themselves are required).
RECORDS = {"recipe", "optim", "tools", "hf_config"}


def key_paths(d, path=()):
    """Every key path of a JSON object: dict keys, and the first item of each list."""
    if isinstance(d, dict):
        for k, v in d.items():
            p = path + (k,)
            yield p
            if not (len(p) == 1 and k in RECORDS):
                yield from key_paths(v, p)
    elif isinstance(d, list) and d:
        yield from key_paths(d[0], path + (0,))


def wrong(v):
    """A JSON value of a type no field of the contract accepts in ``v``'s place."""
    return [1] if isinstance(v, dict) else {"wrong": True}


def damaged(man: dict, path: tuple, how: str) -> dict:
    out = json.loads(json.dumps(man))
    d = out
    for k in path[:-1]:
        d = d[k]
    if how == "remove":
        if isinstance(d, list):
            d.pop(path[-1])
        else:
            del d[path[-1]]
    else:
        d[path[-1]] = wrong(d[path[-1]])
    return out


def dotted(path) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


@pytest.fixture(scope="module", params=["mono", "sharded"])
def bundle(request, exported):
    return exported(request.param)[1]


def test_every_damaged_manifest_key_is_one_clear_error(bundle, tmp_path):
    man = json.loads((bundle / B.MANIFEST).read_text())
    B.Manifest.from_dict(man, "m")  # the undamaged one loads
    cases = 0
    for path in key_paths(man):
        for how in ("remove", "wrong type"):
            if how == "remove" and isinstance(path[-1], int) and len(path) > 1:
                parent = man
                for k in path[:-1]:
                    parent = parent[k]
                if len(parent) == 1:
                    continue  # removing the only item leaves an empty list: checked below
            cases += 1
            bad = damaged(man, path, how)
            try:
                B.Manifest.from_dict(bad, "m")
            except MobiletuneError as e:
                msg = str(e)
                assert "\n" not in msg, msg
                leaf = next((k for k in reversed(path) if isinstance(k, str)), None)
                names = [dotted(path)] + ([leaf] if leaf else [])
                assert any(n in msg for n in names) or "format" in msg, (how, dotted(path), msg)
                continue
            except Exception as e:  # a traceback for the user
                raise AssertionError(f"{how} {dotted(path)}: {type(e).__name__}: {e}") from None
            # the manifest parses (e.g. it lacks a file the runtime needs): opening the
            # bundle must still end in one clear error naming it
            d = tmp_path / f"case{cases}"
            shutil.copytree(bundle, d)
            (d / B.MANIFEST).write_text(json.dumps(bad))
            with pytest.raises(MobiletuneError) as e:
                open_bundle(d)
            assert "\n" not in str(e.value) and str(path[-1]) in str(e.value), str(e.value)
            shutil.rmtree(d)
    assert cases > 200


def test_damaged_files_are_refused_by_name(bundle, tmp_path):
    m = B.read_manifest(bundle)
    files = [e.path for e in m.files.values()] + [B.MANIFEST]
    cases = 0
    for name in files:
        for how in ("missing", "truncated", "flipped header"):
            d = tmp_path / f"{name}-{how}".replace(" ", "-")
            shutil.copytree(bundle, d)
            p = d / name
            data = p.read_bytes()
            if how == "missing":
                p.unlink()
            elif how == "truncated":
                p.write_bytes(data[: len(data) // 2])
            else:
                p.write_bytes(bytes(b ^ 0xFF for b in data[:16]) + data[16:])
            cases += 1
            with pytest.raises(MobiletuneError) as e:
                open_bundle(d)
            assert "\n" not in str(e.value) and name in str(e.value), (name, how, str(e.value))
            shutil.rmtree(d)
    assert cases == 3 * len(files)


@pytest.mark.parametrize("name", [B.PROGRAM, B.STATE])
def test_damaged_files_without_verification_still_fail_cleanly(bundle, tmp_path, name):
    """With the sha256 check off (``verify=False``), the loaders themselves refuse."""
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    p = d / name
    p.write_bytes(bytes(b ^ 0xFF for b in p.read_bytes()[:16]) + p.read_bytes()[16:])
    with pytest.raises(MobiletuneError) as e:
        open_bundle(d, verify=False)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_the_cli_prints_one_line_and_no_traceback(bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    man = json.loads((d / B.MANIFEST).read_text())
    (d / B.MANIFEST).write_text(json.dumps(damaged(man, ("state", 0, "shape"), "wrong type")))
    r = subprocess.run([sys.executable, "-m", "mobiletune.runtime", "train", str(d), "--data",
                        str(d / "tokenizer.json"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "state[0].shape" in lines[0], r.stderr


def test_names_live_in_the_contract_module():
    """Outside ``runtime/bundle.py`` no source file spells a state-name prefix or builds a
    signature name by hand."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"""["'](trainable|acc|opt|frozen)/|f["'](train_step|accumulate|eval|"""
                         r"""block_fwd|block_bwd|norm_fwd|norm_bwd|head_fwd|head_wgrad|opt)_""")
    offenders = []
    for p in list((root / "mobiletune").rglob("*.py")) + list((root / "export").rglob("*.py")):
        if p.name == "bundle.py" and p.parent.name == "runtime":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{p.relative_to(root)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
