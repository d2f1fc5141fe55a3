"""Run a training bundle in the LiteRT interpreter (the phone side: numpy + ai_edge_litert).

``BundleRunner.open(dir)`` validates the manifest (schema version, file sizes and hashes),
loads the program, checks that every signature the manifest names exists with the same
inputs, loads the frozen base weights and the initial (or a given) state, and then exposes
the signatures as methods over numpy arrays.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mobiletune.io import safetensors as st
from mobiletune.runtime.bundle import (
    BASE,
    PROGRAM,
    REEXPORT,
    STATE,
    BundleError,
    Manifest,
    input_name,
    read_manifest,
    train_signatures,
    verify_files,
)


class LiteRTCalls:
    """Signature name + numpy inputs -> numpy outputs, through one LiteRT interpreter.

    Scalars travel as shape (1,) (the bundle contract): a 0-d value is widened here, and a
    program that declares a 0-d input is refused before LiteRT is asked to resize it (that
    resize segfaults ai-edge-litert 2.3.0 on arm64)."""

    def __init__(self, interpreter, source: str = "program"):
        self.it, self.source = interpreter, source
        self._runners = {}

    def runner(self, name: str):
        r = self._runners.get(name)
        if r is None:
            r = self.it.get_signature_runner(name)
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


class BundleRunner:
    def __init__(self, bundle_dir: Path, manifest: Manifest, interpreter):
        self.dir, self.manifest, self.it = bundle_dir, manifest, interpreter
        self._run = LiteRTCalls(interpreter, str(bundle_dir / PROGRAM))

    @classmethod
    def open(cls, bundle_dir, threads: int | None = None, state: dict | None = None,
             verify: bool = True, memory_budget_mb: float | None = None):
        """A ``BundleRunner``, or for a sharded bundle a ``ShardedRunner`` (same interface).
        ``memory_budget_mb`` applies to sharded bundles (see ``runtime.sharded``)."""
        from ai_edge_litert.interpreter import Interpreter
        d = Path(bundle_dir)
        m = read_manifest(d)
        if verify:
            verify_files(d, m)
        try:
            it = Interpreter(model_path=str(d / PROGRAM), num_threads=threads or _cores())
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{d / PROGRAM}: LiteRT cannot load the program ({e})") from None
        have = it.get_signature_list()
        for sig in m.signatures:
            if sig.name not in have:
                raise BundleError(f"{d / PROGRAM}: signature {sig.name!r} named in the manifest "
                                  f"is missing from the program")
            want = sorted(s.name for s in sig.inputs)
            if sorted(have[sig.name]["inputs"]) != want:
                raise BundleError(f"{d / PROGRAM}: signature {sig.name!r} takes "
                                  f"{sorted(have[sig.name]['inputs'])[:4]}..., the manifest says "
                                  f"{want[:4]}...")
        if m.sharded is not None:
            from mobiletune.runtime.sharded import ShardedRunner
            r = ShardedRunner(d, m, LiteRTCalls(it, str(d / PROGRAM)), memory_budget_mb)
        else:
            r = cls(d, m, it)
            if m.frozen:
                r._run("set_frozen", {input_name(k): v for k, v in _load(d / BASE).items()})
        if state is None:
            r.set_state(_load(d / STATE), zeros_for_missing=True)
        else:
            r.set_state(state)
        return r

    # --- state ------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """Contract name -> array, in the manifest's shapes (LiteRT hands scalars out as
        shape (1,))."""
        out = self._run("get_state", {})
        return {s.name: np.array(out[s.name]).reshape(s.shape) for s in self.manifest.state}

    def set_state(self, state: dict[str, np.ndarray], zeros_for_missing: bool = False) -> None:
        """Load a full state. The bundle's ``state.safetensors`` leaves out tensors that
        start at zero (accumulators, optimizer moments); ``zeros_for_missing`` fills them."""
        specs = {s.name: s for s in self.manifest.state}
        if zeros_for_missing:
            state = {**{n: np.zeros(s.shape, s.dtype) for n, s in specs.items()}, **state}
        missing = sorted(set(specs) - set(state))
        if missing:
            raise BundleError(f"state lacks tensor {missing[0]!r} (and {len(missing) - 1} more)")
        inputs = {}
        for name, spec in specs.items():
            a = np.asarray(state[name])
            if tuple(a.shape) != tuple(spec.shape) or a.dtype != np.dtype(spec.dtype):
                raise BundleError(f"state tensor {name!r}: {a.dtype}{list(a.shape)}, the bundle "
                                  f"needs {spec.dtype}{list(spec.shape)}")
            inputs[input_name(name)] = np.asarray(a, order="C")
        self._run("set_state", inputs)

    # --- training ---------------------------------------------------------------------
    def _batch(self, k: int, batch: dict) -> dict:
        if k not in self.manifest.variants:
            raise BundleError(f"micro-batch {k} has no signatures; variants: "
                              f"{list(self.manifest.variants)}")
        return {"inputs": np.asarray(batch["inputs"], np.int32),
                "targets": np.asarray(batch["targets"], np.int32),
                "loss_mask": np.asarray(batch["loss_mask"], np.float32)}

    def train_step(self, batch: dict) -> float:
        k = len(batch["inputs"])
        return float(self._run(train_signatures(k)[0], self._batch(k, batch))["loss"])

    def accumulate(self, batch: dict) -> tuple[float, float]:
        k = len(batch["inputs"])
        out = self._run(train_signatures(k)[1], self._batch(k, batch))
        return float(out["nll"]), float(out["count"])

    def apply(self) -> tuple[float, int]:
        out = self._run("apply", {})
        return float(out["loss"]), int(out["step"])

    def eval(self, batch: dict) -> tuple[float, float]:
        k = len(batch["inputs"])
        out = self._run(train_signatures(k)[2], self._batch(k, batch))
        return float(out["nll"]), float(out["count"])

    def infer(self, tokens, last: int) -> np.ndarray:
        t = np.zeros((1, self.manifest.seq_len), np.int32)
        t[0, : len(tokens)] = tokens
        return np.array(self._run("infer", {"tokens": t, "last": np.int32(last)})["logits"])


def _cores() -> int:
    """The cores this process may run on (LiteRT's own default is one thread)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _load(path: Path) -> dict[str, np.ndarray]:
    try:
        return st.load(path, mmap=False)
    except st.SafetensorsError as e:
        raise BundleError(str(e)) from None
