"""Decoding speed, side by side in one run: ``device generate`` with the KV cache, without it
(``--no-cache``: ``infer`` recomputes the padded window per token, the path before schema
5), and the desktop JAX generator (``mobiletune generate``: ``inference.generate``, jit, its
own KV cache), greedy, on the same model and prompt.

  python benchmarks/decoding.py [--bundle DIR | --monolithic] [--new-tokens 48] [--threads 2]
                                [--out-dir benchmarks/results]

Without ``--bundle`` it exports ``recipes/smollm2_shakespeare_lora.py --sharded --set
lora.dropout=0`` (``--monolithic``: without ``--sharded``, written to ``-decoding-monolithic``;
SmolLM2-135M, window 128; the adapter starts at zero, so the bundle's model is the base
model the desktop generator runs). Each system runs in its own process
(``common.run``) and generates twice from the same prompt: ``cold`` is the first call
(JAX: compiling; device: one interpreter per layer over a program file with the layer's
weights as constants, which XNNPACK packs, and widening the head), ``warm`` the second.
``device-cache-pinned`` decodes as bundles of schema 5 did: the program's ``block_decode``
with each layer's weights pinned as inputs (``decode_constants=False``; for a monolithic
``--bundle``, the program's own ``decode`` over its variables, as schema 5-6 monolithic
bundles decoded; from schema 7 they decode layer by layer as sharded ones). tokens/s = new
tokens / the call's wall time, which includes the prompt's prefill (the two device-cache
systems also report decode-only tokens/s: the warm call less one timed prefill, over the
tokens after the first). The no-cache system generates fewer tokens (``--infer-tokens``):
it is ~15x slower and its rate does not depend on the count (every token costs one
padded-window forward). The greedy tokens of every system are compared (the no-cache run
with the prefix of the others). Ratios are of warm tokens/s. Exit status 1 if a system
failed or the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common

PROMPT = "To be, or not to be, that is the question:"
RECIPE = common.ROOT / "recipes" / "smollm2_shakespeare_lora.py"

CHILD = r'''
import json, sys, time
spec = json.loads(sys.argv[1])
if spec["system"] == "jax":
    from mobiletune.formats.loading import load_model
    from mobiletune.inference.generate import generate
    m = load_model(spec["model"])
    ids = m.tokenizer.encode(spec["prompt"], add_special_tokens=m.tokenizer.adds_bos)
    run = lambda: generate(m.params, m.cfg, ids, spec["n"])
else:
    from mobiletune.runtime.device_trainer import generate_ids
    from mobiletune.runtime.runner import open_bundle
    from mobiletune.runtime.tokenizer import Tokenizer
    r = open_bundle(spec["bundle"], threads=spec["threads"])
    r.decode_constants = spec["system"] != "device-cache-pinned"
    tok = Tokenizer.from_dir(spec["bundle"])
    ids = tok.encode(spec["prompt"], add_special_tokens=tok.adds_bos)
    run = lambda: generate_ids(r, ids, spec["n"], cache=spec["cache"])[0]
times, out = [], None
for _ in range(2):
    t0 = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - t0)
prefill_s = None
if spec["system"].startswith("device-cache"):  # the prompt's share of a warm call
    t0 = time.perf_counter()
    r.prefill(ids)
    prefill_s = time.perf_counter() - t0
print(json.dumps({"ids": out, "prompt_tokens": len(ids), "cold_s": times[0], "warm_s": times[1],
                  "prefill_s": prefill_s}))
'''

SYSTEMS = ("device-cache", "device-cache-pinned", "device-no-cache", "jax")


def measure(system: str, spec: dict, threads: int) -> dict:
    c = common.run([sys.executable, "-c", CHILD, json.dumps({**spec, "system": system})], threads)
    if c.rc:
        return {"status": "failed", "reason": c.error()}
    r = c.last_json()
    n = len(r["ids"])
    decode = None if r["prefill_s"] is None else (n - 1) / (r["warm_s"] - r["prefill_s"])
    return {"status": "ok", **r, "new_tokens": n, "cold_tok_s": n / r["cold_s"],
            "warm_tok_s": n / r["warm_s"], "decode_tok_s": decode, "peak_rss_mb": c.peak_rss_mb}


def table(res: dict) -> str:
    s = res["systems"]
    base = {k: s[k]["warm_tok_s"] for k in SYSTEMS if s[k]["status"] == "ok"}
    out = [f"Decoding, {res['model']} ({res['bundle_kind']} bundle, window {res['window']}), "
           f"prompt {res['prompt_tokens']} tokens, greedy, {res['threads']} threads",
           "", "| system | new tokens | tok/s warm | tok/s cold | decode-only tok/s | "
               "peak RSS MB | vs no-cache | vs JAX |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in SYSTEMS:
        r = s[k]
        if r["status"] != "ok":
            out.append(f"| {k} | failed: {r['reason']} | | | | | | |")
            continue
        ratio = lambda other: (f"{r['warm_tok_s'] / base[other]:.2f}×"  # noqa: E731
                               if other in base else "—")
        dec = "—" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f}"
        out.append(f"| {k} | {r['new_tokens']} | {r['warm_tok_s']:.2f} | {r['cold_tok_s']:.2f} "
                   f"| {dec} | {r['peak_rss_mb']:.0f} | {ratio('device-no-cache')} | "
                   f"{ratio('jax')} |")
    out += ["", f"greedy tokens equal across systems: {res['tokens_equal']}"]
    return "\n".join(out)


def export_bundle(tmp: Path, threads: int, sharded: bool = True) -> str | None:
    """The default bundle (the module docstring's; ``sharded=False``: monolithic) in
    ``tmp``; None, with the export's error on stderr, if it failed."""
    bundle = str(tmp / "bundle")
    ex = common.run([sys.executable, "-m", "export", RECIPE, *(["--sharded"] if sharded else []),
                     "--set", "lora.dropout=0", "--out", bundle, "--no-verify"], threads)
    if ex.rc:
        print(f"export failed: {ex.error()}", file=sys.stderr)
        return None
    return bundle


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="a sharded or monolithic bundle (default: export one)")
    ap.add_argument("--monolithic", action="store_true",
                    help="without --bundle: export the recipe monolithic (~4 min, ~6 GB) "
                         "instead of sharded")
    ap.add_argument("--model", default="smollm2-135m",
                    help="what the desktop generator loads (the bundle's base model)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--infer-tokens", type=int, default=8, help="new tokens without the cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(common.HERE / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mobiletune-decoding-") as tmp:
        bundle = args.bundle or export_bundle(Path(tmp), args.threads, not args.monolithic)
        if bundle is None:
            return 1
        man = json.loads((Path(bundle) / "manifest.json").read_text())
        spec = {"bundle": bundle, "model": args.model, "prompt": PROMPT, "threads": args.threads}
        systems = {}
        for name in SYSTEMS:
            n = args.infer_tokens if name == "device-no-cache" else args.new_tokens
            print(f"{name}: {n} tokens ...", file=sys.stderr, flush=True)
            systems[name] = measure(name, {**spec, "n": n, "cache": name != "device-no-cache"},
                                    args.threads)
    ok = [r for r in systems.values() if r["status"] == "ok"]
    equal = len(ok) == len(SYSTEMS) and all(
        r["ids"] == systems["jax"]["ids"][:len(r["ids"])] for r in ok)
    res = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "threads": args.threads,
           "bundle_kind": "sharded" if man.get("sharded") else "monolithic",
           "window": man["seq_len"], "prompt": PROMPT,
           "prompt_tokens": ok[0]["prompt_tokens"] if ok else None,
           "systems": systems, "tokens_equal": equal}
    md = table(res)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{res['date']}-decoding"
                  + ("-monolithic" if res["bundle_kind"] == "monolithic" else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
