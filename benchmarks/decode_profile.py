"""Where a decoded token's time goes: the layer calls (LiteRT's ``Invoke`` apart from
moving the inputs in and the outputs out), the final norm, the head, the embedding row and
the cache writes, over constant weights and over pinned ones (a monolithic bundle of schema
7: over constants only; its other path is the program's one ``decode`` call).

  python benchmarks/decode_profile.py [--bundle DIR] [--tokens 40] [--threads 2]

Without ``--bundle`` it exports the bundle ``decoding.py`` does (SmolLM2-135M, window 128).
Both decoders run in this one process, one after the other: a 13-token prompt, 3 decode
steps of warm-up, then ``--tokens`` steps timed part by part (the same work as
``ShardedDecoder.decode``, spelled out). The last line is numpy's threaded matvec over the
head, the memory-bandwidth yardstick of the same minute. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from decoding import export_bundle

PARTS = ("set inputs", "invoke", "get outputs", "cache writes", "embed", "norm + head")


def decoder(r, constants: bool):
    """A fresh decoder of the runner's bundle (sharded, or monolithic over constants)."""
    if r.manifest.sharded is None:
        from mobiletune.runtime.monolithic_decode import MonolithicDecoder
        return MonolithicDecoder(r)
    from mobiletune.runtime.sharded.decode import ShardedDecoder
    return ShardedDecoder(r, constants=constants)


def profile(r, constants: bool, n: int) -> dict:
    from mobiletune.runtime import bundle as B
    d = decoder(r, constants)
    prompt = list(range(100, 113))
    logits, cache = d.prefill(prompt)
    pos = len(prompt)
    t = dict.fromkeys(PARTS, 0.0)
    clock = time.perf_counter
    for step in range(3 + n):
        if step == 3:
            t = dict.fromkeys(PARTS, 0.0)
            total = clock()
        ids = np.full((1, 1), int(np.argmax(logits)), np.int32)
        a = clock()
        h = d.r.embed_at(ids, pos)
        t["embed"] += clock() - a
        at = np.full((1,), pos, np.int32)
        for i, call in enumerate(d.layers):
            a = clock()
            for k, v in {"h": h, "pos": at, B.K_CACHE: cache.k[i:i + 1],
                         B.V_CACHE: cache.v[i:i + 1]}.items():
                call._w.SetTensor(call._in[k], v, call._sub)
            b = clock()
            call._w.Invoke(call._sub)
            c = clock()
            out = {k: call._w.GetTensor(j, call._sub) for k, j in call._out}
            e = clock()
            h = out["h"]
            cache.k[i, pos], cache.v[i, pos] = out["k"][0, 0], out["v"][0, 0]
            t["set inputs"] += b - a
            t["invoke"] += c - b
            t["get outputs"] += e - c
            t["cache writes"] += clock() - e
        a = clock()
        logits = d._logits(h)
        t["norm + head"] += clock() - a
        pos += 1
    total = clock() - total
    return {"ms": {k: 1e3 * v / n for k, v in t.items()}, "total_ms": 1e3 * total / n,
            "head": d.head}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="a bundle (default: export decoding.py's sharded one)")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mobiletune-decode-profile-") as tmp:
        bundle = a.bundle or export_bundle(Path(tmp), a.threads)
        if bundle is None:
            return 1
        from mobiletune.runtime.runner import open_bundle
        r = open_bundle(bundle, threads=a.threads)
        names = ("constants", "pinned") if r.manifest.sharded else ("constants",)
        res = {name: profile(r, name == "constants", a.tokens) for name in names}
    w = res["constants"]["head"]                                 # (V, D) float32, as decoded
    x = np.ones(w.shape[1], np.float32)
    w @ x
    s = min(_timed(lambda: w @ x) for _ in range(10))
    kind = "sharded" if r.manifest.sharded else "monolithic"
    print(f"Decoding ({kind} bundle), {a.tokens} tokens after a 13-token prompt, {a.threads} "
          f"threads: ms a token\n\n| part | {' | '.join(names)} |\n|---|"
          + "---:|" * len(names))
    for k in PARTS:
        print(f"| {k} | " + " | ".join(f"{res[n]['ms'][k]:.2f}" for n in names) + " |")
    print("| **a token** | " + " | ".join(f"**{res[n]['total_ms']:.2f}**" for n in names) + " |")
    print(f"\nnumpy's threaded matvec over the head ({w.nbytes / 1e6:.0f} MB): "
          f"{s * 1e3:.2f} ms, {w.nbytes / s / 1e9:.1f} GB/s")
    return 0


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    sys.exit(main())
