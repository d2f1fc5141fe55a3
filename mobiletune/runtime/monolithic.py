"""A monolithic bundle in LiteRT: one program whose signatures share resource variables
(the state). ``MonolithicRunner`` is a ``runtime.runner.Runner``; open it with
``runtime.runner.open_bundle``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mobiletune.runtime import bundle as B
from mobiletune.runtime.runner import (
    HostCache,
    check_position,
    check_state,
    check_variant,
    load_tensors,
    padded_tokens,
)


def program_prefill(call, m: B.Manifest, tokens) -> tuple[np.ndarray, HostCache]:
    """The program's ``prefill``: logits after ``tokens`` and their KV cache."""
    out = call(B.PREFILL, {"tokens": padded_tokens(m, tokens),
                           "last": np.int32(len(tokens) - 1)})
    return np.array(out["logits"]), HostCache(m, out["k"], out["v"])


class MonolithicRunner:
    def __init__(self, bundle_dir: Path, manifest: B.Manifest, calls):
        self.dir, self.manifest, self.call = Path(bundle_dir), manifest, calls
        # decode layer by layer over constant weights (schema 7: ``runtime.monolithic_decode``);
        # False, or an older bundle: the program's ``decode`` (benchmarks compare the two)
        self.decode_constants = True
        self._decoder = None
        if manifest.frozen:
            frozen = load_tensors(self.dir / B.BASE, mmap=True)   # set_frozen copies it
            want = {s.name for s in manifest.frozen}
            if set(frozen) != want:
                lost = sorted(want ^ set(frozen))
                raise B.BundleError(f"{self.dir / B.BASE}: tensor {lost[0]!r} is not what the "
                                    f"manifest's frozen list says")
            self.call(B.SET_FROZEN, {B.input_name(k): v for k, v in frozen.items()})

    def get_state(self) -> dict[str, np.ndarray]:
        """Contract name -> array, in the manifest's shapes (LiteRT hands scalars out as
        shape (1,))."""
        out = self.call(B.GET_STATE, {})
        return {s.name: np.array(out[s.name]).reshape(s.shape) for s in self.manifest.state}

    def set_state(self, state: dict, zeros_for_missing: bool = False) -> None:
        state = check_state(self.manifest, state, zeros_for_missing)
        self.call(B.SET_STATE, {B.input_name(k): np.asarray(v, order="C")
                                for k, v in state.items()})
        self._decoder = None                      # its constants are the old state's

    def load_state(self, path, zeros_for_missing: bool = False) -> None:
        self.set_state(load_tensors(path), zeros_for_missing)

    def release(self, *arrays) -> None:
        pass  # get_state's arrays are copies

    @staticmethod
    def _batch(batch: dict) -> dict:
        return {"inputs": np.asarray(batch["inputs"], np.int32),
                "targets": np.asarray(batch["targets"], np.int32),
                "loss_mask": np.asarray(batch["loss_mask"], np.float32)}

    def train_step(self, batch: dict) -> float:
        k = check_variant(self.manifest, batch)
        self._decoder = None                      # its weights are the state's before the step
        return float(self.call(B.train_step_sig(k), self._batch(batch))["loss"])

    def accumulate(self, batch: dict) -> tuple[float, float]:
        k = check_variant(self.manifest, batch)
        out = self.call(B.accumulate_sig(k), self._batch(batch))
        return float(out["nll"]), float(out["count"])

    def apply(self) -> tuple[float, int]:
        self._decoder = None
        out = self.call(B.APPLY, {})
        return float(out["loss"]), int(np.asarray(out["step"]).reshape(()))

    def eval(self, batch: dict) -> tuple[float, float]:
        k = check_variant(self.manifest, batch)
        out = self.call(B.eval_sig(k), self._batch(batch))
        return float(out["nll"]), float(out["count"])

    def infer(self, tokens, last: int) -> np.ndarray:
        t = padded_tokens(self.manifest, tokens)
        return np.array(self.call(B.INFER, {"tokens": t, "last": np.int32(last)})["logits"])

    def decoder(self):
        """The per-layer decoder over constant weights (``runtime.monolithic_decode``),
        built on first use; None where the bundle has none or ``decode_constants`` is off."""
        if not self.decode_constants or self.manifest.decoding is None:
            return None
        if self._decoder is None:
            from mobiletune.runtime.monolithic_decode import MonolithicDecoder
            self._decoder = MonolithicDecoder(self)
        return self._decoder

    def prefill(self, tokens) -> tuple[np.ndarray, HostCache]:
        d = self.decoder()
        if d is not None:
            return d.prefill(tokens)
        return program_prefill(self.call, self.manifest, tokens)

    def decode(self, token: int, pos: int, cache: HostCache) -> np.ndarray:
        d = self.decoder()
        if d is not None:
            return d.decode(token, pos, cache)
        check_position(self.manifest, pos)
        out = self.call(B.DECODE, {"token": np.full((1, 1), token, np.int32),
                                   "pos": np.int32(pos), B.K_CACHE: cache.k, B.V_CACHE: cache.v})
        cache.k[:, pos] = out["k"][:, 0]
        cache.v[:, pos] = out["v"][:, 0]
        return np.array(out["logits"])
