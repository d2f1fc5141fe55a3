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

    def save(self, step: int, state: dict, meta: dict) -> Path:
        final = self.path(step)
        tmp = atomic.staging_dir(final)
        st.save(tmp / STATE, state)
        atomic.write_text(tmp / META, json.dumps({**meta, "step": step}, indent=1) + "\n")
        atomic.replace_dir(tmp, final)
        for old in self._steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def latest(self, expected_names=None):
        """(step, state, meta) of the newest complete checkpoint, or None."""
        for step in reversed(self._steps()):
            p = self.path(step)
            try:
                meta = json.loads((p / META).read_text(encoding="utf-8"))
                state = st.load(p / STATE, mmap=False)
                if expected_names is not None and set(state) != set(expected_names):
                    raise ValueError(f"holds {len(state)} tensors, the bundle's state has "
                                     f"{len(set(expected_names))}")
                return step, state, meta
            except (OSError, ValueError, st.SafetensorsError) as e:
                self.log(f"checkpoint {p} is damaged ({e}); falling back to the previous one")
        return None
