"""One-row products, the shape of decoding, side by side: how fast each way of holding the
weights streams them (decoding reads every weight once a token, so this is its speed).

  python benchmarks/gemv_weights.py [--layers 30] [--rows 576] [--cols 6144] [--threads 2]
                                    [--batch 1]

``--layers`` separate (rows × cols) float32 weights, together larger than the caches (30 ×
14 MB: a SmolLM2-135M's layers), each multiplied by one row in turn; best of 7 passes:

  ``numpy``         ``x @ w`` (OpenBLAS's threaded sgemv)
  ``litert-const``  a LiteRT program per weight with it as a constant (FULLY_CONNECTED,
                    which XNNPACK packs once: the decode skeletons' way)
  ``litert-input``  the weight as a signature input set once (FULLY_CONNECTED over an
                    input: LiteRT's built-in kernel; how schema 5 bundles decoded)
  ``litert-bmm``    the weight as an input, as a batched matmul (how training multiplies)

Prints a markdown table: ms per pass, GB/s of weights read, GFLOP/s, ratio to
``litert-input``, and for the LiteRT rows the time to build the interpreters (open, allocate,
first call: where XNNPACK packs a constant weight). ``--batch 512 --rows 768 --cols 3072
--layers 4`` asks the same of a training-sized product (512 tokens, a GPT-2 MLP weight).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _program(m: int, k: int, n: int, how: str, w: np.ndarray) -> bytes:
    import tensorflow as tf
    x = tf.TensorSpec((m, k), tf.float32)
    if how == "litert-const":
        f = tf.function(lambda a: tf.matmul(a, tf.constant(w.T.copy()), transpose_b=True),
                        input_signature=[x])
    elif how == "litert-input":
        f = tf.function(lambda a, b: tf.matmul(a, b, transpose_b=True),
                        input_signature=[x, tf.TensorSpec((n, k), tf.float32)])
    else:
        f = tf.function(lambda a, b: tf.matmul(a, b),
                        input_signature=[x, tf.TensorSpec((k, n), tf.float32)])
    return tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f).convert()


def best(run, reps: int = 7) -> float:
    out = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        run()
        out = min(out, time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", type=int, default=576, help="the product's inputs (k)")
    ap.add_argument("--cols", type=int, default=6144, help="its outputs (n)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1, help="rows of the input (m)")
    a = ap.parse_args(argv)
    from ai_edge_litert.interpreter import Interpreter
    rng = np.random.default_rng(0)
    m, k, n = a.batch, a.rows, a.cols
    ws = [rng.standard_normal((k, n)).astype(np.float32) for _ in range(a.layers)]
    x = rng.standard_normal((m, k)).astype(np.float32)
    nbytes = sum(w.nbytes for w in ws)
    rows, build = {"numpy": best(lambda: [x @ w for w in ws])}, {}
    for how in ("litert-const", "litert-input", "litert-bmm"):
        its, programs = [], [_program(m, k, n, how, w) for w in ws]
        t = time.perf_counter()
        for w, prog in zip(ws, programs):
            it = Interpreter(model_content=prog, num_threads=a.threads)
            it.allocate_tensors()
            for d in it.get_input_details():
                it.set_tensor(d["index"], x if tuple(d["shape"]) == (m, k)
                              else (w if how == "litert-bmm" else w.T.copy()))
            it.invoke()
            its.append(it)
        build[how] = time.perf_counter() - t
        rows[how] = best(lambda its=its: [it.invoke() for it in its])
    flops = 2 * m * k * n * a.layers
    print(f"{a.layers} × ({k}×{n}) float32 weights, {m} row(s), {a.threads} threads "
          f"({nbytes / 2**20:.0f} MB a pass)\n")
    print("| weights | ms a pass | GB/s | GFLOP/s | vs litert-input | build ms |\n"
          "|---|---:|---:|---:|---:|---:|")
    for how, s in rows.items():
        b = f"{build[how] * 1e3:.0f}" if how in build else "—"
        print(f"| {how} | {s * 1e3:.1f} | {nbytes / s / 1e9:.1f} | {flops / s / 1e9:.0f} | "
              f"{rows['litert-input'] / s:.2f}× | {b} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
