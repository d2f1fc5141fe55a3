"""An arm64 Debian userland under qemu-user, for running the phone side as a phone would.

``Arm64Env.ensure()`` makes (or reuses from ``$MOBILETUNE_HOME/arm64/``) a Debian bookworm
arm64 root filesystem and returns a runner, or raises ``Unavailable`` with the exact reason
(not root, no binfmt_misc, a host tool that would not install). How:

* host tools: ``qemu-user-static``, ``binfmt-support``, ``mmdebstrap`` from the host's apt
  sources; ``binfmt_misc`` mounted and ``qemu-aarch64`` enabled with the F flag, so a plain
  ``chroot`` runs arm64 programs (the kernel starts the host's static qemu for them);
* the root filesystem: ``mmdebstrap --variant=extract`` of python3, python3-venv,
  coreutils, dash and libstdc++6 (what a proot-distro Debian has after ``apt install
  python3 python3-venv``), with the host's own apt sources. ``extract`` unpacks packages
  without running their maintainer scripts under emulation (seconds instead of minutes); the
  two things those scripts would do that matter here, ``/etc/passwd`` and the loader cache,
  are done by hand;
* each command runs in a private mount namespace (``unshare -m``; ``-n`` too when the
  network must be absent) with ``/proc``, ``/dev`` and the test's work directory mounted
  into the root, and an arm64 ``/proc/cpuinfo`` bound over the host's one: qemu-user 7.2
  shows arm64 programs the host's x86 cpuinfo, which crashes the cpuinfo library inside
  LiteRT (XNNPACK). That is an emulation artefact; a phone has its own cpuinfo. qemu emulates
  a Neoverse-N1 (the Cortex-A76 core of many phones).

The exec chain (unshare -> bash -> chroot -> env -> program) keeps one PID, so ``kill -9``
of ``Popen.pid`` kills the emulated program itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "coreutils", "dash", "libc-bin", "base-passwd",
            "base-files", "libstdc++6")
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "update-binfmts": "binfmt-support",
              "mmdebstrap": "mmdebstrap"}
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CPU = "neoverse-n1"
WORK = "/work"  # where the host work directory appears inside the root
CPUINFO_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                    "asimdrdm lrcpc dcpop asimddp")


class Unavailable(Exception):
    """This machine cannot run the arm64 environment; the message says exactly why."""


def _sh(cmd, what: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except FileNotFoundError as e:
        raise Unavailable(f"{what}: {e}") from None
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what}: no answer in {timeout:.0f} s") from None
    if r.returncode != 0:
        raise Unavailable(f"{what} failed (exit {r.returncode}): "
                          f"{(r.stderr or r.stdout).strip()[-600:]}")
    return r


def cpuinfo(n: int) -> str:
    """A plausible arm64 /proc/cpuinfo (Neoverse-N1 / Cortex-A76 class), ``n`` cores."""
    return "".join(f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {CPUINFO_FEATURES}\n"
                   f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\n"
                   f"CPU part\t: 0xd0c\nCPU revision\t: 1\n\n" for i in range(n))


class Arm64Env:
    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        self.cpuinfo = root.parent / "cpuinfo.arm64"

    # --- making it -------------------------------------------------------------------------
    @classmethod
    def ensure(cls, cache: Path, work: Path, log=print) -> "Arm64Env":
        if os.geteuid() != 0:
            raise Unavailable(f"not root (uid {os.geteuid()}): installing qemu-user-static, "
                              f"mounting binfmt_misc and chroot need root")
        missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
        if missing:
            log(f"arm64: apt-get install {' '.join(missing)}")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            _sh(["apt-get", "update", "-q"], "apt-get update", env=env)
            _sh(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                f"apt-get install {' '.join(missing)}", env=env)
        cls._binfmt()
        root = cache / f"{SUITE}-arm64-extract"
        work.mkdir(parents=True, exist_ok=True)
        env = cls(root, work)
        if not (root / ".complete").is_file():
            env._build(log)
        env.cpuinfo.write_text(cpuinfo(os.cpu_count() or 2))
        return env

    @staticmethod
    def _binfmt() -> None:
        if not (BINFMT / "status").exists():
            r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise Unavailable(f"binfmt_misc is not mounted and cannot be ({r.stderr.strip()}); "
                                  f"the kernel must offer binfmt_misc to run arm64 programs")
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
        entry = BINFMT / "qemu-aarch64"
        text = entry.read_text() if entry.exists() else ""
        if not text.startswith("enabled"):
            raise Unavailable(f"{entry}: not enabled after update-binfmts --enable qemu-aarch64 "
                              f"({text.splitlines()[:1]})")
        flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                      if ln.startswith("flags:")), "")
        if "F" not in flags:
            raise Unavailable(f"{entry}: flags {flags!r} lack F (fix-binary), so a chroot cannot "
                              f"find the host's qemu-aarch64-static")

    def _build(self, log) -> None:
        tmp = self.root.with_name(self.root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if not SOURCES.is_file():
            raise Unavailable(f"{SOURCES}: missing; the root filesystem is built from the "
                              f"host's Debian apt sources")
        log(f"arm64: mmdebstrap --variant=extract {SUITE} ({', '.join(PACKAGES)})")
        _sh(["mmdebstrap", "--arch=arm64", "--variant=extract", f"--include={','.join(PACKAGES)}",
             SUITE, str(tmp), str(SOURCES)], "mmdebstrap (arm64 root filesystem)")
        for name in ("passwd", "group"):  # base-passwd's postinst, which extract skips
            shutil.copy(tmp / f"usr/share/base-passwd/{name}.master", tmp / f"etc/{name}")
        for d in ("proc", "dev", "sys", "root", WORK.lstrip("/")):
            (tmp / d).mkdir(exist_ok=True)
        (tmp / "tmp").mkdir(exist_ok=True)
        (tmp / "tmp").chmod(0o1777)
        os.replace(tmp, self.root)
        self.cpuinfo.write_text(cpuinfo(os.cpu_count() or 2))
        r = self.run(["/sbin/ldconfig"], timeout=120)       # libc-bin's trigger, emulated
        if r.returncode != 0:
            raise Unavailable(f"ldconfig in the arm64 root failed: {r.stderr.strip()[-300:]}")
        r = self.run(["/usr/bin/python3", "-c", "import platform; print(platform.machine())"],
                     timeout=120)
        if r.stdout.strip() != "aarch64":
            raise Unavailable(f"python3 in the arm64 root does not run: rc {r.returncode}, "
                              f"{(r.stderr or r.stdout).strip()[-300:]}")
        (self.root / ".complete").write_text("ok\n")

    # --- running in it --------------------------------------------------------------------
    def argv(self, cmd, cwd: str = WORK, network: bool = False, env: dict | None = None) -> list:
        """``cmd`` run inside the root (the host work dir mounted at ``/work``)."""
        variables = {"HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
                     "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "QEMU_CPU": QEMU_CPU, "PYTHONUNBUFFERED": "1", **(env or {})}
        script = ('R="$1"; W="$2"; C="$3"; I="$4"; shift 4; '
                  'mount -t proc proc "$R/proc" && mount --rbind /dev "$R/dev" && mount --rbind /sys "$R/sys" && '
                  'mount --bind "$W" "$R/work" && mount --bind "$C" "$R/proc/cpuinfo" && '
                  'exec chroot "$R" /usr/bin/env -i -C "$I" "$@"')
        ns = ["--mount", "--propagation", "private"] + ([] if network else ["--net"])
        return ["unshare", *ns, "/bin/bash", "-c", script, "arm64", str(self.root),
                str(self.work), str(self.cpuinfo), cwd,
                *[f"{k}={v}" for k, v in variables.items()], *cmd]

    def run(self, cmd, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(cmd, **kw), capture_output=True, text=True,
                              timeout=timeout)

    def popen(self, cmd, stdout, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd, **kw), stdout=stdout, stderr=subprocess.STDOUT)

    def inside(self, host_path) -> str:
        """The path inside the root of a file under the host work directory."""
        return f"{WORK}/{Path(host_path).resolve().relative_to(self.work.resolve()).as_posix()}"
