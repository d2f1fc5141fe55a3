"""``run.py``'s results as a markdown report (ratios next to the issue's goals) and PNG bars."""

from __future__ import annotations

from pathlib import Path

import peak as peak_probe

# The goals for the device trainer, and the scale figures it quotes for this machine.
SPEED_VS_TORCH, RSS_VS_TORCH, SPEED_VS_JAX, MFU = 1.2, 0.25, 1.0, 0.60
FULL_RSS_GB, FULL_SPEED_VS_TORCH = 1.0, 0.8  # full fine-tuning on the sharded trainer
REFERENCE = (  # (system, workload, tokens/s, peak RSS GB)
    ("transformers+PEFT", "GPT-2 small LoRA", 150, 2.2),
    ("transformers+PEFT", "Gemma 3 270M LoRA", 68, 4.3),
    ("MobileFineTuner (C++)", "GPT-2 small LoRA", 55, 1.94),
    ("MobileFineTuner (C++)", "Gemma 3 270M LoRA", 12, 5.8),
)


def _x(v, fmt="{:.2f}×"):
    return "" if v is None else fmt.format(v)


def _rows(res):
    for name, w in res["workloads"].items():
        for s, r in w["systems"].items():
            yield name, w, s, r


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# Fine-tuning benchmark, {res['date']}" + (" (--quick)" if res["quick"] else ""), "",
           f"`{res['command']}`: median of {res['steps']} steps after one warm-up step; torch "
           f"and numpy on {res['threads']} threads ({m['cpus']} CPUs); fp32 GEMM peak "
           f"{m['matmul_peak_gflops']:.1f} GFLOP/s (the best probe below). Each system ran "
           f"in its own process; compare ratios within this run, not absolute numbers across "
           f"runs.", ""]
    if "peak" in m:
        out += peak_probe.table(m["peak"]) + [""]
    out += ["| workload | system | s/step | tokens/s | peak RSS MB | MFU | speed vs torch | "
            "RSS vs torch | speed vs JAX | speed vs best peer |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, w, s, r in _rows(res):
        if r["status"] != "ok":
            out.append(f"| {name} | {s} | {r['status']} | | | | | | | |")
            continue
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
        out.append(f"| {name} | {s} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                   f"{r['peak_rss_mb']:.0f} | {mfu} | {_x(r.get('vs_torch_speed'))} | "
                   f"{_x(r.get('vs_torch_rss'))} | {_x(r.get('vs_jax_speed'))} | "
                   f"{_x(r.get('vs_best_peer_speed'))} |")
    out += ["", "Workloads: " + "; ".join(f"**{n}** {w['label']}"
                                         for n, w in res["workloads"].items()) + "."]
    exports = [(n, s, r) for n, _, s, r in _rows(res) if r.get("export")]
    if exports:
        out += ["", "| workload | system | export s | converter peak RSS MB | bundle bytes | "
                    "params | trainable |", "|---|---|---:|---:|---:|---:|---:|"]
        for n, s, r in exports:
            e = r["export"]
            out.append(f"| {n} | {s} | {e['export_seconds']:.1f} | {e['peak_rss_mb']:.0f} | "
                       f"{e['bundle_bytes']:,} | {e['params']:,} | {e['trainable_params']:,} |")
    notes = [(n, s, r) for n, _, s, r in _rows(res) if r["status"] != "ok"]
    if notes:
        out += [""] + [f"- {n} / {s}: {r['status']}: {r.get('reason', '')}" for n, s, r in notes]
    out += ["", "## Goals (issue)", "", "| goal | workload | system | measured | met |",
            "|---|---|---|---:|---|"] + goal_rows(res)
    out += ["", "## Reference figures quoted in the issue (this machine; not measured by this "
                "script)", "", "| system | workload | tokens/s | peak RSS GB |", "|---|---|---:|---:|"]
    out += [f"| {a} | {b} | ≈{c} | {d} |" for a, b, c, d in REFERENCE]
    out += ["", "MFU = model FLOPs/s ÷ the best fp32 GEMM probe above; model FLOPs per token: full "
                "fine-tuning 6·N, LoRA 4·N, N = non-embedding parameters + the head's matmul "
                "(V·d). See `benchmarks/run.py`.", ""]
    return "\n".join(out)


def goal_rows(res: dict) -> list[str]:
    rows = []

    def add(goal, n, s, v, target, fmt, le=False):
        met = "" if v is None else ("yes" if (v <= target if le else v >= target) else "no")
        rows.append(f"| {goal} | {n} | {s} | {_x(v, fmt)} | {met} |")
    for n, w, s, r in _rows(res):
        if s.startswith("device-sharded") and w["lora"] is None and r["status"] == "ok":
            add(f"full FT peak RSS ≤ {FULL_RSS_GB} GB", n, s, r["peak_rss_mb"] / 1024,
                FULL_RSS_GB, "{:.2f} GB", le=True)
            add(f"full FT ≥ {FULL_SPEED_VS_TORCH}× transformers tokens/s", n, s,
                r.get("vs_torch_speed"), FULL_SPEED_VS_TORCH, "{:.2f}×")
        if not s.startswith("device") or w["lora"] is None or r["status"] != "ok":
            continue
        add(f"≥ {SPEED_VS_TORCH}× the best peer's tokens/s", n, s, r.get("vs_best_peer_speed"),
            SPEED_VS_TORCH, "{:.2f}×")
        add(f"≤ {RSS_VS_TORCH}× transformers+PEFT peak RSS", n, s, r.get("vs_torch_rss"),
            RSS_VS_TORCH, "{:.2f}×", le=True)
        add(f"≥ {SPEED_VS_JAX}× JAX desktop tokens/s", n, s, r.get("vs_jax_speed"),
            SPEED_VS_JAX, "{:.2f}×")
        if w["mfu_goal"]:
            add(f"MFU ≥ {MFU:.0%}", n, s, r.get("mfu"), MFU, "{:.1%}")
    return rows or ["| (no device system ran) | | | | |"]


def plots(res: dict, stem: Path) -> list[Path]:
    """Grouped bars per workload, one bar per system: tokens/s and peak RSS."""
    return [_bars(res, "tokens_per_s", "tokens/s (higher is better)", Path(f"{stem}-tokens-per-s.png")),
            _bars(res, "peak_rss_mb", "peak RSS, MB (lower is better)", Path(f"{stem}-peak-rss.png"))]


def _bars(res: dict, key: str, ylabel: str, png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["workloads"])
    systems = list(dict.fromkeys(s for w in res["workloads"].values() for s in w["systems"]))
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(6.4 + 0.8 * len(names), 4.0), dpi=100)
    for j, s in enumerate(systems):
        for i, n in enumerate(names):
            r = res["workloads"][n]["systems"].get(s)
            x = i + (j - (len(systems) - 1) / 2) * width
            if r is None:
                continue
            if r["status"] == "ok":
                ax.bar(x, r[key], width, color=f"C{j}", label=s if _first(res, s, n) else None)
            else:  # mark the gap: does not fit / not available / failed
                ax.text(x, 0, r["status"], rotation=90, ha="center", va="bottom", fontsize=7,
                        color=f"C{j}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel.split(' (')[0]}, {res['date']}" + (" (quick)" if res["quick"] else ""))
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend()
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png


def _first(res, s, n) -> bool:
    """Whether workload ``n`` is the first where system ``s`` has a bar (one legend entry)."""
    for name, w in res["workloads"].items():
        if w["systems"].get(s, {}).get("status") == "ok":
            return name == n
    return False
