"""``mobiletune device kit BUNDLE --out KIT``: everything an arm64 phone needs, offline.

A kit is a directory (and ``KIT.tar.gz`` beside it)::

    bundle/          a copy of the training bundle
    wheels/          a wheel of this mobiletune + the aarch64 (manylinux) wheels of the
                     runtime extra's dependencies, for each chosen CPython version (with
                     ``fed=True``, ``--fed``: also plain Flower's, for ``flower-supernode``)
    setup.sh         installs them into ./venv with no network (POSIX sh)
    SHA256SUMS       every file above; setup.sh checks them first
    kit.json         what the kit holds: versions, Pythons, bundle, wheel files

It is built on the desktop, where the package registry is reachable: the mobiletune wheel
is built from this source checkout (or given with ``wheel=``), and the dependencies are
the runtime extra's ``Requires-Dist`` lines of that wheel (with ``fed``: and the ``fed``
extra's Flower pin, without its ``[simulation]`` engine, which the phone does not run),
fetched by ``pip download
--only-binary=:all: --platform manylinux_*_aarch64 --python-version X.Y``. The wheels are
manylinux (glibc) wheels: they install in a glibc userland such as Debian or Ubuntu under
Termux's proot-distro, not in Termux's own Python, which is built on Android's bionic libc.

Standard library only (this module lives with the phone side; it shells out to pip).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic
from mobiletune.runtime.bundle import read_manifest, verify_files

KIT_FORMAT = "mobiletune-phone-kit"
KIT_VERSION = 1
PYTHONS = ("3.11", "3.12", "3.13")   # Debian 12, Ubuntu 24.04, Debian 13 / Ubuntu 25.04
# ai-edge-litert 2.3.0 ships manylinux_2_27_aarch64 only; pip matches tags exactly, so ask
# for every glibc level a wheel may be tagged with (newest first), down to manylinux2014.
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")
MIN_GLIBC = "2.27"


class KitError(MobiletuneError):
    """A kit that cannot be built: no source checkout, no wheel for a Python, pip failed."""


def parse_pythons(spec: str) -> tuple[str, ...]:
    out = []
    for v in (x.strip() for x in spec.split(",") if x.strip()):
        if not re.fullmatch(r"3\.\d{1,2}", v):
            raise KitError(f"--python {v!r}: expected versions like 3.11,3.12")
        out.append(v)
    if not out:
        raise KitError("--python: give at least one version, e.g. 3.11")
    return tuple(dict.fromkeys(out))


def _pip(args: list[str], what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        tail = [s for s in (r.stderr or r.stdout).strip().splitlines() if s.startswith("ERROR")]
        tail = tail or (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise KitError(f"{what}: pip failed: {' / '.join(tail)[:600]}")


def source_checkout() -> Path:
    """The source tree this mobiletune runs from (where ``pyproject.toml`` names it)."""
    root = Path(__file__).resolve().parents[2]
    pp = root / "pyproject.toml"
    if not pp.is_file() or 'name = "mobiletune"' not in pp.read_text(encoding="utf-8"):
        raise KitError(f"{root}: not a mobiletune source checkout (no pyproject.toml naming "
                       f"it); pass --wheel with a mobiletune wheel instead")
    return root


def build_wheel(dest: Path) -> Path:
    """A wheel of the source checkout, built without network when setuptools is here."""
    src = source_checkout()
    iso = []
    try:
        import setuptools  # noqa: F401
        iso = ["--no-build-isolation"]
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="mobiletune-wheel-") as tmp:
        _pip(["wheel", "--no-deps", *iso, "-q", "-w", tmp, str(src)], f"building a wheel of {src}")
        built = sorted(Path(tmp).glob("mobiletune-*.whl"))
        if len(built) != 1:
            raise KitError(f"building a wheel of {src}: pip made {len(built)} mobiletune wheels")
        return Path(shutil.copy2(built[0], dest / built[0].name))


def _requires(wheel: Path) -> list[tuple[str, str]]:
    """The wheel's ``Requires-Dist`` lines as (requirement, marker)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode("utf-8").splitlines()
    except (OSError, zipfile.BadZipFile, StopIteration) as e:
        raise KitError(f"{wheel}: not a readable wheel ({e})") from None
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req, _, marker = line[len("Requires-Dist:"):].partition(";")
            out.append((req.strip(), marker.strip().replace("'", '"')))
    return out


def runtime_requirements(wheel: Path) -> list[str]:
    """The wheel's base requirements plus those of its ``runtime`` extra."""
    out = [req for req, marker in _requires(wheel) if not marker or marker == 'extra == "runtime"']
    if not out:
        raise KitError(f"{wheel}: declares no runtime requirements")
    return sorted(dict.fromkeys(out))


def fed_requirements(wheel: Path) -> list[str]:
    """The ``fed`` extra's Flower requirement as the phone installs it: the same pin without
    extras (``flwr[simulation]==1.42.0`` -> ``flwr==1.42.0``): a SuperNode needs no ray."""
    out = [re.sub(r"\[[^\]]*\]", "", req) for req, marker in _requires(wheel)
           if marker == 'extra == "fed"' and re.match(r"flwr\b", req)]
    if len(out) != 1 or "==" not in out[0]:
        raise KitError(f"{wheel}: its fed extra should pin exactly one flwr==X.Y.Z, found {out}")
    return out


def download_wheels(reqs: list[str], python: str, dest: Path) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    _pip(["download", "-q", "--only-binary=:all:", "--implementation", "cp", "--python-version",
          python, *plat, "-d", str(dest), *reqs],
         f"aarch64 wheels for Python {python} ({', '.join(reqs)})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_kit(bundle, out, pythons=PYTHONS, wheel=None, tar: bool = True, fed: bool = False,
              log=print) -> dict:
    """Write the kit directory ``out`` (atomically: built beside it, then renamed) and
    ``out.tar.gz``; returns ``kit.json``'s content. ``fed``: the kit also carries Flower, and
    setup.sh installs it, so the phone can run ``flower-supernode`` with the ClientApp."""
    bundle, out = Path(bundle), Path(out)
    m = read_manifest(bundle)
    verify_files(bundle, m)
    tmp = atomic.staging_dir(out)
    (tmp / "wheels").mkdir()
    try:
        log(f"kit: copying the bundle {bundle}")
        shutil.copytree(bundle, tmp / "bundle")
        if wheel is None:
            log("kit: building a wheel of this mobiletune")
            whl = build_wheel(tmp / "wheels")
        else:
            whl = Path(shutil.copy2(wheel, tmp / "wheels" / Path(wheel).name))
        reqs = runtime_requirements(whl)
        extra = fed_requirements(whl) if fed else []
        reqs = reqs + extra
        for py in pythons:
            log(f"kit: aarch64 wheels for Python {py}: {', '.join(reqs)}")
            download_wheels(reqs, py, tmp / "wheels")
        version = whl.name.split("-")[1]
        (tmp / "setup.sh").write_text(SETUP_SH.replace("@VERSION@", version)
                                      .replace("@PYTHONS@", " ".join(pythons))
                                      .replace("@MIN_GLIBC@", MIN_GLIBC)
                                      .replace("@EXTRA@", " ".join(f"'{r}'" for r in extra))
                                      .replace("@IMPORTS@", ", flwr.clientapp" if fed else "")
                                      .replace("@NEXT@", NEXT_FED if fed else ""),
                                      encoding="utf-8")
        (tmp / "setup.sh").chmod(0o755)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        sums = {p.relative_to(tmp).as_posix(): _sha256(p) for p in files}
        (tmp / "SHA256SUMS").write_text("".join(f"{h}  {n}\n" for n, h in sums.items()),
                                        encoding="utf-8")
        info = {"format": KIT_FORMAT, "kit_version": KIT_VERSION, "mobiletune": version,
                "pythons": list(pythons), "platforms": list(PLATFORMS), "min_glibc": MIN_GLIBC,
                "requirements": reqs, "fed": fed, "bundle": {"sharded": m.sharded is not None,
                                                 "program_sha256": m.files["program"].sha256},
                "wheels": sorted(p.name for p in (tmp / "wheels").iterdir()),
                "bytes": sum(p.stat().st_size for p in files)}
        atomic.write_text(tmp / "kit.json", json.dumps(info, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.replace_dir(tmp, out)
    if tar:
        archive = out.with_name(out.name + ".tar.gz")
        log(f"kit: writing {archive}")
        with atomic.atomic_writer(archive) as f, tarfile.open(fileobj=f, mode="w:gz",
                                                              compresslevel=1) as t:
            t.add(out, arcname=out.name)
        info["archive_bytes"] = archive.stat().st_size
    return info


SETUP_SH = r"""#!/bin/sh
# Install mobiletune's phone-side runtime (@VERSION@) from this kit, with no network:
#   sh setup.sh [VENV]          (default VENV: ./venv beside this script)
# Needs an aarch64 glibc Linux userland with python3 and its venv module, e.g. Debian or
# Ubuntu in Termux's proot-distro (apt install python3 python3-venv). Wheels inside for
# CPython @PYTHONS@.
set -eu
KIT=$(cd "$(dirname "$0")" && pwd)
VENV=${1:-$KIT/venv}
PY=${PYTHON:-python3}
fail() { echo "setup.sh: $*" >&2; exit 1; }

if [ -n "${TERMUX_VERSION:-}" ] || case "${PREFIX:-}" in *com.termux*) true;; *) false;; esac; then
  fail "this is Termux's own shell: its Python is built on Android's bionic libc and cannot \
load manylinux wheels (numpy, ai-edge-litert). Run it in a glibc userland: pkg install \
proot-distro; proot-distro install debian; proot-distro login debian; apt install python3 \
python3-venv; then sh setup.sh again"
fi
arch=$(uname -m)
[ "$arch" = aarch64 ] || fail "this kit carries aarch64 wheels; this machine is $arch"
command -v "$PY" >/dev/null 2>&1 || fail "no $PY: apt install python3 python3-venv"
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case " @PYTHONS@ " in
  *" $pyver "*) ;;
  *) fail "Python $pyver; this kit has wheels for @PYTHONS@ (build one on the desktop with \
mobiletune device kit BUNDLE --out KIT --python $pyver)";;
esac
glibc=$("$PY" -c 'import platform; print(platform.libc_ver()[1] or "0")')
"$PY" -c "import sys; a = tuple(map(int, '$glibc'.split('.'))); \
sys.exit(a < tuple(map(int, '@MIN_GLIBC@'.split('.'))))" \
  || fail "glibc $glibc; the wheels need glibc >= @MIN_GLIBC@ (Debian 10+, Ubuntu 18.04+)"
echo "checking the kit's files (SHA256SUMS)"
(cd "$KIT" && sha256sum -c --quiet SHA256SUMS) || fail "a file of the kit is damaged: copy it again"
echo "creating $VENV (Python $pyver, glibc $glibc)"
"$PY" -m venv "$VENV" || fail "python3 -m venv failed: apt install python3-venv"
"$VENV/bin/python" -m pip install --no-index --no-cache-dir --disable-pip-version-check -q \
  --find-links "$KIT/wheels" "mobiletune[runtime]==@VERSION@" @EXTRA@ \
  || fail "pip could not install from $KIT/wheels"
"$VENV/bin/python" -c \
  "import mobiletune.runtime.litert, ai_edge_litert.interpreter, numpy, tokenizers@IMPORTS@" \
  || fail "the installed runtime does not import"
echo "installed. Next:"
echo "  $VENV/bin/python -m mobiletune.runtime doctor $KIT/bundle"
echo "  $VENV/bin/python -m mobiletune.runtime train $KIT/bundle --data YOUR.txt --out run"@NEXT@
"""
NEXT_FED = ('\necho "  $VENV/bin/flower-supernode --root-certificates ca.crt --superlink HOST:9190 '
            '--auth-supernode-private-key KEY --node-config \\"partition-id=I run-dir=\'RUN\'\\""')
