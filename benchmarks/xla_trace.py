"""Sum an XLA:CPU trace (``jax.profiler``) per op and per class of op.

XLA:CPU runs a compiled step as a graph of thunks (fusions, dots, copies), mostly one at a
time, each spread over the intra-op threads; so the trace's thunk durations add up to about
the wall time (more where independent thunks, such as the optimizer's per-param updates,
ran at once).
Each thunk is named after its HLO instruction; the compiled module's text gives that
instruction's ``op_name`` (the JAX primitive path: ``jvp(...)`` for the forward,
``transpose(jvp(...))`` for the backward, ``while/body`` for the loss head's chunk loop)
and its output shape, which is how a thunk is put in a class.
"""

from __future__ import annotations

import collections
import glob
import re

from jax.profiler import ProfileData

# events that wrap others (their time is their children's) or mark ends
_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ", "while",
             "call", "conditional")
_INSTR = re.compile(r"%([\w.\-]+) = (\S+) [\w\-]+\(.*?metadata=\{op_name=\"([^\"]*)\"")
CLASSES = ("matmuls", "head matmuls", "head, elementwise", "forward/backward, elementwise",
           "optimizer and the rest")


def op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (op_name, output shape) of a compiled module's text."""
    return {m.group(1): (re.sub(r"jit\(\w+\)/", "", m.group(3)), m.group(2).split("{")[0])
            for m in _INSTR.finditer(hlo_text)}


def classify(kind: str, op: str) -> str:
    head = "/while/" in op
    if "dot_general" in op or kind.startswith("dot"):
        return "head matmuls" if head else "matmuls"
    if head:
        return "head, elementwise"
    if "jvp(" in op or "transpose(" in op:
        return "forward/backward, elementwise"
    return "optimizer and the rest"


def summarize(trace_dir: str, hlo_text: str, steps: int, top: int = 12) -> dict:
    """Seconds per step by class and the ``top`` ops (kind, shape, op_name) by time."""
    names = op_names(hlo_text)
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    ops = collections.defaultdict(lambda: [0.0, 0])
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                kind = re.sub(r"\.\d+$", "", ev.name)
                if kind.startswith(_WRAPPERS):
                    continue
                op, shape = names.get(ev.name, ("?", "?"))
                o = ops[(kind, shape, op)]
                o[0] += ev.duration_ns / 1e9 / steps
                o[1] += 1
    classes = dict.fromkeys(CLASSES, 0.0)
    for (kind, _, op), (s, _) in ops.items():
        classes[classify(kind, op)] += s
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    return {"classes": classes, "traced_s": sum(classes.values()),
            "top": [{"s": s, "per_step": n // steps, "kind": k, "shape": sh, "op": op[:90]}
                    for (k, sh, op), (s, n) in ranked]}
