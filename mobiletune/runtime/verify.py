"""``python -m mobiletune.runtime.verify BUNDLE``: load a bundle the way the phone does and
run each kind of signature once on a zero batch; fail if any heavy framework got imported.
The exporter runs this in a fresh process after writing every bundle."""

from __future__ import annotations

import sys

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.runtime.bundle import train_signatures
from mobiletune.runtime.litert import BundleRunner

FORBIDDEN = ("jax", "jaxlib", "flax", "optax", "tensorflow", "torch", "transformers")


def verify(bundle: str) -> list[str]:
    r = BundleRunner.open(bundle)
    m = r.manifest
    k = min(m.variants)
    z = np.zeros((k, m.seq_len), np.int32)
    batch = {"inputs": z, "targets": z, "loss_mask": np.ones((k, m.seq_len), np.float32)}
    nll, count = r.eval(batch)
    state = r.get_state()
    assert set(state) == {s.name for s in m.state}, "get_state names differ from the manifest"
    assert np.isfinite(nll) and count == k * m.seq_len
    if m.sharded is None:  # a sharded bundle's signatures are checked by BundleRunner.open
        logits = r.infer([0], 0)
        assert logits.shape == (m.model["vocab_size"],)
        for name in train_signatures(k):
            assert name in {s.name for s in m.signatures}
    return sorted(x for x in sys.modules if x.split(".")[0] in FORBIDDEN)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m mobiletune.runtime.verify BUNDLE", file=sys.stderr)
        return 2
    try:
        heavy = verify(sys.argv[1])
    except MobiletuneError as e:
        print(f"mobiletune: error: {e}", file=sys.stderr)
        return 2
    if heavy:
        print(f"error: the phone-side loader imported {heavy}", file=sys.stderr)
        return 1
    print(f"ok: {sys.argv[1]} loads and runs in LiteRT without JAX/TF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
