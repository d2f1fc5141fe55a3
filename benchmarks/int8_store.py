"""Int8 frozen weights (``export --sharded --store-dtype int8``) against float32 and float16
stores, side by side in one run.

    python benchmarks/int8_store.py [--model smollm2-135m] [--steps 4] [--lora-steps 0]

1. Bundle bytes, and the phone trainer's seconds per step and peak RSS (``device train``,
   median after one warm-up step) for each store dtype, same recipe (the SmolLM2
   Shakespeare LoRA recipe, b4 x s128).
2. The quality cost on the base model: Botchan perplexity (4 windows of 512) with the
   float32 weights and with the weights an int8 store gives back (``ppl --int8-base``).
3. With ``--lora-steps N``: N LoRA steps on eight plays from the float32 and the int8 bundle
   (same data order), then held-out Hamlet perplexity: each adapter over the base it trained
   on, and the int8-trained adapter over the original float32 base (as PEFT loads it).

Prints markdown tables; writes ``benchmarks/results/<date>-int8.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import runpy
import sys
import tempfile
from pathlib import Path

from common import ROOT, median, run  # noqa: E402

PY = sys.executable
DTYPES = ("float32", "float16", "int8")
RECIPE = ROOT / "recipes" / "smollm2_shakespeare_lora.py"


def sh(cmd, threads: int = 2):
    c = run([str(x) for x in cmd], threads)
    if c.rc:
        raise SystemExit(f"failed ({c.rc}): {' '.join(map(str, cmd))}\n{c.stderr[-2000:]}")
    return c


def ppl(model: str, text: str, *extra) -> float:
    out = sh([PY, "-m", "mobiletune", "ppl", "--model", model, "--text", text, "--seq-len", "512",
              "--max-windows", "4", *extra]).stdout.strip().splitlines()[-1]
    return float(out.split()[0].removeprefix("ppl="))


def bundle_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4, help="timed phone steps per store (+1 warm-up)")
    ap.add_argument("--lora-steps", type=int, default=0, help="also train this long and compare quality")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from mobiletune import assets
    plays = runpy.run_path(str(RECIPE))["PLAYS"]
    data = [str(assets.text_path(f"shakespeare:{p}")) for p in plays]
    res = {"model": args.model, "steps": args.steps, "lora_steps": args.lora_steps, "stores": {}}
    with tempfile.TemporaryDirectory(prefix="mobiletune-int8-") as tmp:
        tmp = Path(tmp)
        total = max(args.lora_steps, args.steps + 1)
        for dt in DTYPES:
            b = tmp / f"bundle-{dt}"
            sh([PY, "-m", "mobiletune", "export", RECIPE, "--sharded", "--store-dtype", dt,
                "--set", f"model={args.model}", "--set", "lora.dropout=0", "--set", f"steps={total}",
                "--variants", "4", "--out", b])
            c = sh([PY, "-m", "mobiletune", "device", "train", b, "--data", data[0], "--out",
                    tmp / f"time-{dt}", "--steps", str(args.steps + 1), "--battery", "none"])
            rows = [json.loads(x) for x in (tmp / f"time-{dt}" / "metrics.jsonl").read_text().splitlines()]
            secs = [r["seconds"] for r in rows if "seconds" in r and r.get("loss") is not None]
            res["stores"][dt] = {"bundle_bytes": bundle_bytes(b), "step_s": median(secs[1:] or secs),
                                 "peak_rss_mb": c.peak_rss_mb}
            print(f"{dt}: {res['stores'][dt]}", file=sys.stderr, flush=True)
        res["botchan_ppl"] = {"float32": ppl(args.model, "botchan"),
                              "int8": ppl(args.model, "botchan", "--int8-base")}
        if args.lora_steps:
            q = {}
            for dt in ("float32", "int8"):
                out = tmp / f"lora-{dt}"
                sh([PY, "-m", "mobiletune", "device", "train", tmp / f"bundle-{dt}", "--data", *data,
                    "--out", out, "--steps", str(args.lora_steps), "--battery", "none"])
                base = ["--int8-base"] if dt == "int8" else []
                q[dt] = ppl(args.model, "shakespeare:hamlet", "--adapter", out / "adapter", *base)
            q["int8 adapter over the float32 base"] = ppl(args.model, "shakespeare:hamlet", "--adapter",
                                                          tmp / "lora-int8" / "adapter")
            q["base"] = ppl(args.model, "shakespeare:hamlet")
            res["hamlet_ppl"] = q
    report(res, Path(args.out_dir))
    return 0


def report(res: dict, out_dir: Path) -> None:
    s = res["stores"]
    f32 = s["float32"]
    lines = [f"# Int8 weight store, {res['model']} ({datetime.date.today()})", "",
             "| store | bundle bytes | vs float32 | phone s/step | vs float16 | phone peak RSS MB | vs float16 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for dt, r in s.items():
        lines.append(f"| {dt} | {r['bundle_bytes']:,} | {r['bundle_bytes'] / f32['bundle_bytes']:.2f}× | "
                     f"{r['step_s']:.2f} | {r['step_s'] / s['float16']['step_s']:.2f}× | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / s['float16']['peak_rss_mb']:.2f}× |")
    b = res["botchan_ppl"]
    lines += ["", "| base model, Botchan ppl (4 × 512) | float32 weights | int8 store's weights | change |",
              "|---|---:|---:|---:|",
              f"| {res['model']} | {b['float32']:.4f} | {b['int8']:.4f} | {100 * (b['int8'] / b['float32'] - 1):+.2f} % |"]
    if "hamlet_ppl" in res:
        h = res["hamlet_ppl"]
        lines += ["", f"| {res['lora_steps']} LoRA steps on the phone, Hamlet ppl (4 × 512) | ppl | vs float32 run |",
                  "|---|---:|---:|"]
        for k, v in h.items():
            lines.append(f"| {k} | {v:.4f} | {100 * (v / h['float32'] - 1):+.2f} % |")
    text = "\n".join(lines) + "\n"
    print(text)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{datetime.date.today()}-int8"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
