"""One interface over both kinds of bundle: ``open_bundle(dir)`` returns a ``Runner``.

A runner holds a bundle's training state and runs its signatures: the device trainer,
``device generate``, ``doctor`` and the checks in ``verify`` use only this interface, so a
monolithic bundle (``runtime.monolithic``: one program over LiteRT resource variables) and
a sharded one (``runtime.sharded``: per-block signatures, the state on the host) are
interchangeable. The checks both share live here: a full, well-typed state; a micro-batch
size the bundle has signatures for; a prompt that fits the window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from mobiletune.io import safetensors as st
from mobiletune.runtime.bundle import (
    PROGRAM,
    STATE,
    BundleError,
    Manifest,
    read_manifest,
    verify_files,
)


class Runner(Protocol):
    manifest: Manifest

    def get_state(self) -> dict[str, np.ndarray]:
        """The whole state by contract name (may be read-only views: copy or write it out
        before the next step)."""

    def set_state(self, state: dict, zeros_for_missing: bool = False) -> None:
        """Load a whole state; ``zeros_for_missing`` fills tensors the dict leaves out."""

    def load_state(self, path, zeros_for_missing: bool = False) -> None:
        """``set_state`` from a safetensors file (a streamed sharded state reads it tensor
        by tensor into its store; nothing else holds a copy)."""

    def release(self, *arrays) -> None:
        """``get_state`` arrays already written out may leave the resident set (a streamed
        sharded state drops their pages; a no-op elsewhere)."""

    def accumulate(self, batch: dict) -> tuple[float, float]:
        """Add one micro-batch's summed-NLL gradients: (summed NLL, counted tokens)."""

    def apply(self) -> tuple[float, int]:
        """One optimizer step on what was accumulated: (mean loss, steps taken so far)."""

    def eval(self, batch: dict) -> tuple[float, float]:
        """(summed NLL, counted tokens) of a micro-batch, no update."""

    def infer(self, tokens, last: int) -> np.ndarray:
        """Next-token logits (V,) at position ``last`` of ``tokens``."""

    def prefill(self, tokens) -> tuple[np.ndarray, "HostCache"]:
        """Next-token logits (V,) after ``tokens`` and their KV cache."""

    def decode(self, token: int, pos: int, cache: "HostCache") -> np.ndarray:
        """Next-token logits (V,) after ``token`` at position ``pos``; writes its keys and
        values into slot ``pos`` of ``cache``."""


class HostCache:
    """The KV cache of one sequence, held by the host between ``prefill`` / ``decode``
    calls: keys and values (L, T, K, Dh) float32, T the bundle's window. Slots at and after
    the next position hold padding the program masks out."""

    def __init__(self, m: Manifest, k=None, v=None):
        c = m.model
        shape = (c["num_layers"], m.seq_len, c["num_kv_heads"], c["head_dim"])
        self.k = np.zeros(shape, np.float32) if k is None else np.ascontiguousarray(k, np.float32)
        self.v = np.zeros(shape, np.float32) if v is None else np.ascontiguousarray(v, np.float32)
        if self.k.shape != shape or self.v.shape != shape:
            raise BundleError(f"KV cache of shape {self.k.shape}, the bundle's is {shape}")


def check_position(m: Manifest, pos: int) -> None:
    if not 0 <= pos < m.seq_len:
        raise BundleError(f"decode position {pos} is outside the bundle's window of {m.seq_len}")


def open_bundle(bundle_dir, threads: int | None = None, state: dict | None = None,
                verify: bool = True, memory_budget_mb: float | None = None,
                state_dir=None, state_store: str = "auto", head: str = "program") -> Runner:
    """Validate the manifest (and, with ``verify``, every file's size and sha256), load the
    program into LiteRT, check its signatures against the manifest, and load the initial
    state (or ``state``). ``memory_budget_mb``, ``state_dir`` and ``state_store`` apply to
    sharded bundles: the trainable state streams from a file under ``state_dir`` when
    ``runtime.sharded.state_store.choose`` says so; ``head``: where their training steps
    run the head (``host``: numpy, or ``program``: LiteRT)."""
    from mobiletune.runtime.litert import LiteRTCalls
    d = Path(bundle_dir)
    m = read_manifest(d)
    if "program" not in m.files:
        raise BundleError(f"{d / 'manifest.json'}: key 'files.program' is missing (a bundle "
                          f"exported without its program cannot run)")
    if verify:
        verify_files(d, m)
    calls = LiteRTCalls.open(d / PROGRAM, m, threads)
    if m.sharded is not None:
        from mobiletune.runtime.sharded import ShardedRunner
        r = ShardedRunner(d, m, calls, memory_budget_mb, state_dir, state_store, head)
    else:
        from mobiletune.runtime.monolithic import MonolithicRunner
        r = MonolithicRunner(d, m, calls)
    if state is None:
        try:
            r.load_state(d / STATE, zeros_for_missing=True)
        except st.SafetensorsError as e:
            raise BundleError(str(e)) from None
    else:
        r.set_state(state)
    return r


def load_tensors(path: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """A safetensors file's tensors (``mmap``: read-only views of its memory map, whose
    clean pages leave the resident set with the last view)."""
    try:
        return st.load(path, mmap=mmap)
    except st.SafetensorsError as e:
        raise BundleError(str(e)) from None


def check_state(m: Manifest, state: dict, zeros_for_missing: bool = False) -> dict:
    """``state`` completed (zeros where allowed) and checked against the manifest: every
    tensor present, none extra, each with the manifest's shape and dtype."""
    specs = {s.name: s for s in m.state}
    if zeros_for_missing:  # read-only zeros that take no memory (a full FT's moments)
        state = {**{n: np.broadcast_to(np.zeros((), s.dtype), s.shape) for n, s in specs.items()
                    if n not in state}, **state}
    missing = sorted(set(specs) - set(state))
    if missing:
        raise BundleError(f"state lacks tensor {missing[0]!r} (and {len(missing) - 1} more)")
    extra = sorted(set(state) - set(specs))
    if extra:
        raise BundleError(f"state tensor {extra[0]!r} is not part of this bundle's state")
    out = {}
    for name, spec in specs.items():
        a = np.asarray(state[name])
        if tuple(a.shape) != tuple(spec.shape) or a.dtype != np.dtype(spec.dtype):
            raise BundleError(f"state tensor {name!r}: {a.dtype}{list(a.shape)}, the bundle "
                              f"needs {spec.dtype}{list(spec.shape)}")
        out[name] = a
    return out


def check_variant(m: Manifest, batch: dict) -> int:
    k = len(batch["inputs"])
    if k not in m.variants:
        raise BundleError(f"micro-batch {k} has no signatures; variants: {list(m.variants)}")
    return k


def padded_tokens(m: Manifest, tokens) -> np.ndarray:
    """(1, seq_len) int32: ``tokens`` then zeros (positions after ``last`` do not matter)."""
    if len(tokens) > m.seq_len:
        raise BundleError(f"{len(tokens)} tokens do not fit the bundle's window of {m.seq_len}")
    t = np.zeros((1, m.seq_len), np.int32)
    t[0, : len(tokens)] = tokens
    return t
