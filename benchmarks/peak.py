"""The honest yardstick: the best fp32 GEMM this machine reaches, probed in the same run as
the workloads, each probe in its own child process on the same threads.

  python benchmarks/peak.py [--threads 2]

Probes (best of 5 after a warm-up):
  ``numpy``        2048³ sgemm with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` removed
                   from that child's environment alone (a pinned core type can pick a
                   slower kernel); the BLAS and kernel it ran are recorded (threadpoolctl)
  ``torch``        torch.matmul 2048³, ``torch.set_num_threads(threads)``
  ``litert-bmm``   a bare LiteRT program, 512×768 @ 768×3072 with both operands as inputs
                   (BATCH_MATMUL: how sharded bundles multiply by streamed weights)
  ``litert-fc``    the same with the weights as a constant (FULLY_CONNECTED)

MFU in ``run.py`` is against ``best``, the highest of them. The CPU's model name and vector
flags go beside it: the same "kind" of machine differs by vendor (AMD vs Intel moves torch's
MKL 2×), so ratios only mean something next to what was measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

PROBES = ("numpy", "torch", "litert-bmm", "litert-fc")
PINNED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                "avx512_bf16", "amx_tile", "asimd", "sve")

_TIME = r"""
import json, time
def best_of(f, flops, n=5):
    f(); best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter(); f(); best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9
"""

CODE = {
    "numpy": _TIME + r"""
import numpy as np
n = 2048
rng = np.random.default_rng(0)
a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
out = {"gflops": best_of(lambda: a @ b, 2 * n ** 3)}
try:
    from threadpoolctl import threadpool_info
    out["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                   for i in threadpool_info() if i.get("user_api") == "blas"]
except ImportError:
    out["blas"] = "threadpoolctl not installed"
print(json.dumps(out))
""",
    "torch": _TIME + r"""
import os, torch
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
n = 2048
a, b = torch.randn(n, n), torch.randn(n, n)
print(json.dumps({"gflops": best_of(lambda: torch.matmul(a, b), 2 * n ** 3),
                  "torch": torch.__version__, "mkl": torch.backends.mkl.is_available()}))
""",
    "litert": _TIME + r"""
import os, sys, tempfile
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
const = sys.argv[1] == "fc"
m, k, n = 512, 768, 3072
rng = np.random.default_rng(0)
w = rng.standard_normal((k, n), dtype=np.float32)
if const:
    f = tf.function(lambda x: tf.matmul(x, tf.constant(w)),
                    input_signature=[tf.TensorSpec((m, k), tf.float32)])
else:
    f = tf.function(lambda x, y: tf.matmul(x, y),
                    input_signature=[tf.TensorSpec((m, k), tf.float32), tf.TensorSpec((k, n), tf.float32)])
conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
it = Interpreter(model_content=conv.convert(), num_threads=int(os.environ["OMP_NUM_THREADS"]))
it.allocate_tensors()
ins = it.get_input_details()
it.set_tensor(ins[0]["index"], rng.standard_normal((m, k), dtype=np.float32))
if not const:
    it.set_tensor(ins[1]["index"], w)
ops = sorted({d["op_name"] for d in it._get_ops_details()})
print(json.dumps({"gflops": best_of(it.invoke, 2 * m * k * n), "ops": ops}))
""",
}


def cpu() -> dict:
    """The CPU's model name and the vector flags that matter for GEMM."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            if key.strip() in ("model name", "Model") and model == "unknown":
                model = val.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return {"model": model, "vector_flags": [f for f in VECTOR_FLAGS if f in flags],
            "cpus": os.cpu_count()}


def probe(name: str, threads: int) -> dict:
    env = common.child_env(threads)
    if name == "numpy":
        for k in PINNED:
            env.pop(k, None)
    code, args = (CODE["litert"], [name.split("-")[1]]) if name.startswith("litert") else (CODE[name], [])
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=env, cwd=common.ROOT, timeout=600)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        err = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        return {"status": "failed", "error": err}
    return {"status": "ok", **json.loads(lines[-1])}


def measure(threads: int) -> dict:
    """Every probe, the best of them, and the CPU; also what the workplace pinned."""
    got = {name: probe(name, threads) for name in PROBES}
    ok = {k: v["gflops"] for k, v in got.items() if v["status"] == "ok"}
    if not ok:
        raise SystemExit("matmul peak: every probe failed: " + json.dumps(got))
    best = max(ok, key=ok.get)
    return {"probes": got, "best": best, "best_gflops": ok[best], "cpu": cpu(),
            "pinned_env": {k: os.environ.get(k) for k in PINNED}, "threads": threads}


def table(peak: dict) -> list[str]:
    c = peak["cpu"]
    out = [f"CPU: {c['model']} ({c['cpus']} CPUs; {' '.join(c['vector_flags']) or 'no flags read'}); "
           f"environment: " + ", ".join(f"{k}={v}" for k, v in peak["pinned_env"].items()),
           "", f"| fp32 GEMM probe ({peak['threads']} threads) | GFLOP/s | vs best | notes |",
           "|---|---:|---:|---|"]
    for name, r in peak["probes"].items():
        if r["status"] != "ok":
            out.append(f"| {name} | — | — | failed: {r['error']} |")
            continue
        note = {"numpy": lambda: "; ".join(f"{b.get('internal_api')} {b.get('version')} "
                                           f"{b.get('architecture')}" for b in r["blas"])
                if isinstance(r["blas"], list) else r["blas"],
                "torch": lambda: f"torch {r.get('torch')}, MKL {r.get('mkl')}"}.get(
                    name, lambda: "ops: " + ", ".join(r.get("ops", [])))()
        out.append(f"| {name} | {r['gflops']:.1f} | {r['gflops'] / peak['best_gflops']:.2f}× | {note} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print("\n".join(table(measure(args.threads))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
