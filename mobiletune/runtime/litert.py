"""LiteRT behind one small interface: signature name + numpy inputs -> numpy outputs.

``LiteRTCalls.open(path, manifest)`` loads a bundle's program and checks that every
signature the manifest names exists with the same inputs. Scalars travel as shape (1,)
(the bundle contract): a 0-d value is widened here, and a program that declares a 0-d input
is refused before LiteRT is asked to resize it (that resize segfaults ai-edge-litert 2.3.0
on arm64). One interpreter is not thread-safe: keep its calls on one thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobiletune.runtime.bundle import REEXPORT, BundleError, Manifest


def usable_cores() -> int:
    """The cores this process may run on (LiteRT's own default is one thread)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class LiteRTCalls:
    def __init__(self, interpreter, source: str = "program"):
        self.it, self.source = interpreter, source
        self._runners = {}

    @classmethod
    def open(cls, path: Path, manifest: Manifest, threads: int | None = None) -> "LiteRTCalls":
        from ai_edge_litert.interpreter import Interpreter
        try:
            it = Interpreter(model_path=str(path), num_threads=threads or usable_cores())
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: LiteRT cannot load the program ({e})") from None
        have = it.get_signature_list()
        for sig in manifest.signatures:
            if sig.name not in have:
                raise BundleError(f"{path}: signature {sig.name!r} named in the manifest "
                                  f"is missing from the program")
            want = sorted(s.name for s in sig.inputs)
            if sorted(have[sig.name]["inputs"]) != want:
                raise BundleError(f"{path}: signature {sig.name!r} takes "
                                  f"{sorted(have[sig.name]['inputs'])[:4]}..., the manifest says "
                                  f"{want[:4]}...")
        return cls(it, str(path))

    def runner(self, name: str):
        r = self._runners.get(name)
        if r is None:
            try:
                r = self.it.get_signature_runner(name)
            except ValueError as e:
                raise BundleError(f"{self.source}: {e}") from None
            for key, d in r.get_input_details().items():
                if len(d["shape"]) == 0:
                    raise BundleError(f"{self.source}: signature {name!r} input {key!r} is 0-d; "
                                      f"LiteRT 2.3.0 crashes resizing 0-d inputs on arm64, so "
                                      f"scalars must travel as shape (1,); re-export: {REEXPORT}")
            self._runners[name] = r
        return r

    def __call__(self, name: str, inputs: dict) -> dict:
        r = self.runner(name)
        args = {k: (np.reshape(v, (1,)) if np.ndim(v) == 0 else v) for k, v in inputs.items()}
        try:
            return r(**args)
        except ValueError as e:
            raise BundleError(f"signature {name!r}: {e}") from None
