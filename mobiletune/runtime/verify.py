"""``python -m mobiletune.runtime.verify BUNDLE``: load a bundle the way the phone does and
run one micro-batch of evaluation (and, for a monolithic bundle, ``infer``) on a zero
batch, and one ``prefill`` + ``decode`` (KV-cache decoding; not for side-tuning bundles);
fail if any desktop framework got imported. The exporter runs this in a fresh
process after writing every bundle."""

from __future__ import annotations

import sys

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.runtime.bundle import BundleError
from mobiletune.runtime.runner import open_bundle

FORBIDDEN = ("jax", "jaxlib", "flax", "optax", "tensorflow", "torch", "transformers")


def verify(bundle: str) -> list[str]:
    """The desktop frameworks this process imported (none is expected); raises
    ``BundleError`` for a bundle that does not run as its manifest says."""
    r = open_bundle(bundle)
    m = r.manifest
    k = min(m.variants)
    z = np.zeros((k, m.seq_len), np.int32)
    if m.side is not None:  # forward only: the backbone chain at every variant
        nll, count = 0.0, k * m.seq_len
        for v in m.variants:
            if not np.isfinite(r.hidden_states(np.zeros((v, m.seq_len), np.int32))[-1]).all():
                raise BundleError(f"{bundle}: the block_fwd chain gave non-finite states")
    else:
        nll, count = r.eval({"inputs": z, "targets": z,
                             "loss_mask": np.ones(z.shape, np.float32)})
    if not np.isfinite(nll) or count != k * m.seq_len:
        raise BundleError(f"{bundle}: eval of a zero batch gave nll={nll}, count={count} "
                          f"(expected a finite nll over {k * m.seq_len} tokens)")
    names = set(r.get_state())
    if names != {s.name for s in m.state}:
        raise BundleError(f"{bundle}: get_state returns {sorted(names ^ {s.name for s in m.state})[:3]} "
                          f"unlike the manifest's state")
    if m.sharded is None or 1 in m.variants:
        logits = r.infer([0], 0)
        if logits.shape != (m.model["vocab_size"],):
            raise BundleError(f"{bundle}: infer gave logits of shape {logits.shape}, expected "
                              f"({m.model['vocab_size']},)")
    if m.side is None and m.seq_len > 1:
        logits, kv = r.prefill([0])
        logits = np.concatenate([logits, r.decode(0, 1, kv)])
        if logits.shape != (2 * m.model["vocab_size"],) or not np.isfinite(logits).all():
            raise BundleError(f"{bundle}: prefill + decode gave logits of shape "
                              f"{logits.shape} (finite: {np.isfinite(logits).all()}), expected "
                              f"two finite rows of {m.model['vocab_size']}")
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
        print(f"mobiletune: error: the phone-side loader imported {heavy}", file=sys.stderr)
        return 1
    print(f"ok: {sys.argv[1]} loads and runs in LiteRT without JAX/TF")
    return 0


if __name__ == "__main__":
    sys.exit(main())
