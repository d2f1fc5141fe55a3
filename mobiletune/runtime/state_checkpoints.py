"""The phone's checkpoints: ``<out>/checkpoints/step-NNNNNNN/{state.safetensors,meta.json}``.

A checkpoint is written into a temporary directory (files fsynced) and renamed into place,
so a kill at any moment leaves complete checkpoints only; the last ``keep`` are kept. On
resume the newest one that reads back completely is used; a damaged newer one is reported
and skipped (nothing else is lost: the previous one is complete by construction).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mobiletune.io import atomic
from mobiletune.io import safetensors as st

STATE = "state.safetensors"
META = "meta.json"


class Checkpoints:
    def __init__(self, directory, keep: int = 2, log=print):
        self.dir = Path(directory)
        self.keep = keep
        self.log = log

    def _steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            if p.name.startswith("step-") and p.name[5:].isdigit():
                out.append(int(p.name[5:]))
        return sorted(out)

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:07d}"

    def save(self, step: int, state: dict, meta: dict, after=None) -> Path:
        """``after(array)``: called once each tensor is written (``st.save``)."""
        final = self.path(step)
        tmp = atomic.staging_dir(final)
        st.save(tmp / STATE, state, after=after)
        atomic.write_text(tmp / META, json.dumps({**meta, "step": step}, indent=1) + "\n")
        atomic.replace_dir(tmp, final)
        for old in self._steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def newest(self, expected_names=None):
        """(step, path of its state file, meta) of the newest complete checkpoint (its
        header read and its tensors' extents checked against the file's size), or None."""
        for step in reversed(self._steps()):
            p = self.path(step)
            try:
                meta = json.loads((p / META).read_text(encoding="utf-8"))
                names = st.shapes(p / STATE)
                if expected_names is not None and set(names) != set(expected_names):
                    raise ValueError(f"holds {len(names)} tensors, the bundle's state has "
                                     f"{len(set(expected_names))}")
                return step, p / STATE, meta
            except (OSError, ValueError, st.SafetensorsError) as e:
                self.log(f"checkpoint {p} is damaged ({e}); falling back to the previous one")
        return None

    def latest(self, expected_names=None):
        """(step, state, meta) of the newest complete checkpoint, or None."""
        got = self.newest(expected_names)
        if got is None:
            return None
        step, path, meta = got
        return step, st.load(path, mmap=False), meta
