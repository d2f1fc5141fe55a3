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
    def __init__(self, interpreter, source: str = "program", threads: int | None = None):
        self.it, self.source, self.threads = interpreter, source, threads
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
        return cls(it, str(path), threads)

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


class PinnedCall:
    """One signature on an interpreter of its own whose inputs stay set between calls.

    LiteRT's ``SignatureRunner`` resizes and copies every input on every call; per-block
    decoding would then copy a block's whole weights per token. Here the first call sets
    every input (``fixed``, e.g. one layer's weights, and the first ``inputs``); later calls
    copy in only the inputs they are given and run. It relies on two facts: LiteRT's arena
    planner never reuses the memory of a graph input (inputs keep their values across
    ``Invoke``), and an interpreter per pinned signature keeps one block's inputs from
    another's. Uses ``SignatureRunner``'s tensor indices (ai-edge-litert 2.3.0's attributes
    ``_interpreter_wrapper``, ``_subgraph_index``, ``_inputs``, ``_outputs``); where they
    are missing it falls back to full calls (correct, slower)."""

    def __init__(self, path: Path, name: str, fixed: dict, inputs: dict,
                 threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter
        self.it = Interpreter(model_path=str(path), num_threads=threads or usable_cores())
        self.calls = LiteRTCalls(self.it, str(path))
        self.name, self.fixed = name, fixed
        self.calls(name, {**fixed, **inputs})
        r = self.calls.runner(name)
        need = ("_interpreter_wrapper", "_subgraph_index", "_inputs", "_outputs")
        self._fast = all(hasattr(r, a) for a in need)
        if self._fast:
            self._w, self._sub = r._interpreter_wrapper, r._subgraph_index
            self._in, self._out = dict(r._inputs), list(r._outputs)
            self.fixed = None               # copied into the interpreter; not kept twice

    def __call__(self, inputs: dict) -> dict:
        if not self._fast:
            return self.calls(self.name, {**self.fixed, **inputs})
        for k, v in inputs.items():
            self._w.SetTensor(self._in[k], np.reshape(v, (1,)) if np.ndim(v) == 0 else v,
                              self._sub)
        self._w.Invoke(self._sub)
        return {k: self._w.GetTensor(i, self._sub) for k, i in self._out}
