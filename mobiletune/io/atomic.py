"""Atomic writes: a file (or a directory) appears whole under its final name or not at all.

Files are written to a temporary name in the same directory, flushed and fsynced, then
renamed over the target (``os.replace`` is atomic within a file system) and the directory
is fsynced, so a process killed at any moment leaves the old file or the new one. The
one place every layer writes files through (standard library only).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO


class atomic_writer:
    """``with atomic_writer(path) as f: f.write(...)``. On an exception the temporary file
    is removed and ``path`` is untouched. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8)."""

    def __init__(self, path: str | Path, mode: str = "wb"):
        self.path = Path(path)
        self.mode = mode

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.",
                                        suffix=".tmp")
        self.f = os.fdopen(fd, self.mode, **({} if "b" in self.mode else {"encoding": "utf-8"}))
        return self.f

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                _data_mode(self.tmp)
                os.replace(self.tmp, self.path)
                fsync_dir(self.path.parent)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False


def _data_mode(path) -> None:
    """mkstemp/mkdtemp make 0600/0700; data files get the usual mode under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def fsync_dir(d: str | Path) -> None:
    """Make a rename in ``d`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_writer(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def copy_stream(src: BinaryIO, path: str | Path) -> None:
    """Copy an open binary stream into ``path``, atomically."""
    with atomic_writer(path) as f:
        shutil.copyfileobj(src, f)


def copy_file(src: str | Path, path: str | Path) -> None:
    with open(src, "rb") as f:
        copy_stream(f, path)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Move a fully written directory ``tmp`` to ``final`` (replacing an old one) and make it
    durable. ``tmp`` must be a sibling of ``final``. Replacing an existing directory is two
    renames (aside, then in); a kill between them leaves ``final`` absent and its old copy
    under a ``.old`` name, never a half-written ``final``."""
    tmp, final = Path(tmp), Path(final)
    _data_mode(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(final: str | Path) -> Path:
    """A fresh, empty sibling directory to build ``final`` in (for ``replace_dir``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
