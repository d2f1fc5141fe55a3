"""EdgeFlowerTune's three protocols over federated runs (``mobiletune fed bench``), read
from each run's ``metrics.jsonl`` (rows: round, val-ppl, mc-acc, bytes-total, wall-s,
energy-j-total, peak-rss-mb). Our reading of the protocols' names (the paper's full
definitions were not available offline):

* **quality-under-budget**: the best held-out quality a method reaches within a fixed
  budget of total bytes, of (simulated) wall-clock and of client energy — three budgets,
  each on its own; default budgets are the smallest final total among the runs that spend
  any (so every method is read within what the cheapest complete run used).
* **cost-to-target**: bytes, wall-clock, energy and peak client memory at the first round
  whose held-out perplexity is at most the target (default: the local-only run's final
  perplexity when there is one, else the median final); ∞ if never reached.
* **robustness**: each perturbed run (dropouts, stragglers, battery traces) against the
  clean run: final perplexity and accuracy, and their cost, relative to the clean one
  (``all`` scores it only when a clean run is named, i.e. there are perturbed runs).

Writes ``OUT/<protocol>.md`` and ``.json``, ``OUT/rounds.md`` (every run round by round:
held-out perplexity, and bytes, wall-clock and energy per round) and the figures ``quality_vs_bytes.png`` and
``quality_vs_wall.png`` (held-out perplexity against cumulative bytes and wall-clock, one
line per run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic

PROTOCOLS = ("quality-under-budget", "cost-to-target", "robustness")
INF = math.inf


def load(run) -> list[dict]:
    p = Path(run) / "metrics.jsonl"
    if not p.is_file():
        raise MobiletuneError(f"{p}: no metrics log (run it first)")
    rows = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not rows:
        raise MobiletuneError(f"{p}: empty metrics log")
    return rows


def _fmt(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def quality_under_budget(runs: dict[str, list[dict]], bytes_=None, wall=None, energy=None) -> dict:
    def smallest(key):
        finals = [r[-1][key] for r in runs.values() if r[-1][key] > 0]
        return min(finals) if finals else 0.0
    budgets = {"bytes-total": bytes_ if bytes_ is not None else smallest("bytes-total"),
               "wall-s": wall if wall is not None else smallest("wall-s"),
               "energy-j-total": energy if energy is not None else smallest("energy-j-total")}
    res = {}
    for name, rows in runs.items():
        res[name] = {}
        for key, b in budgets.items():
            ok = [r for r in rows if r[key] <= b + 1e-9]
            res[name][key] = {"best-ppl": min(r["val-ppl"] for r in ok),
                              "best-acc": max((r["mc-acc"] for r in ok if "mc-acc" in r), default=None)}
    return {"budgets": budgets, "runs": res}


def cost_to_target(runs: dict[str, list[dict]], target=None) -> dict:
    if target is None:
        local = [r for n, r in runs.items() if r[-1].get("method") == "local-only"]
        finals = sorted(r[-1]["val-ppl"] for r in runs.values())
        target = local[0][-1]["val-ppl"] if local else finals[len(finals) // 2]
    res = {}
    for name, rows in runs.items():
        hit = next((i for i, r in enumerate(rows) if r["val-ppl"] <= target), None)
        if hit is None:
            res[name] = {"round": None, "bytes": INF, "wall-s": INF, "energy-j": INF, "peak-rss-mb": INF}
        else:
            r = rows[hit]
            res[name] = {"round": r["round"], "bytes": float(r["bytes-total"]), "wall-s": r["wall-s"],
                         "energy-j": r["energy-j-total"],
                         "peak-rss-mb": max(x.get("peak-rss-mb", 0.0) for x in rows[:hit + 1])}
    return {"target-ppl": target, "runs": res}


def robustness(clean: list[dict], perturbed: dict[str, list[dict]]) -> dict:
    c = clean[-1]
    res = {}
    for name, rows in perturbed.items():
        f = rows[-1]
        res[name] = {"final-ppl": f["val-ppl"], "ppl-vs-clean": f["val-ppl"] / c["val-ppl"],
                     "acc-vs-clean": (f["mc-acc"] - c["mc-acc"]) if "mc-acc" in f and "mc-acc" in c else None,
                     "bytes-vs-clean": f["bytes-total"] / max(c["bytes-total"], 1),
                     "wall-vs-clean": f["wall-s"] / max(c["wall-s"], 1e-9),
                     "energy-vs-clean": f["energy-j-total"] / max(c["energy-j-total"], 1e-9),
                     "failed": sum(len(r.get("failed", [])) for r in rows),
                     "rejected": sum(len(r.get("rejected", [])) for r in rows)}
    return {"clean-final-ppl": c["val-ppl"], "runs": res}


def markdown(protocol: str, res: dict) -> str:
    if protocol == "quality-under-budget":
        b = res["budgets"]
        head = (f"Budgets: {b['bytes-total'] / 1e6:.3f} MB, {b['wall-s']:.1f} s wall-clock, "
                f"{b['energy-j-total']:.1f} J client energy.\n\n")
        rows = [[n, v["bytes-total"]["best-ppl"], v["bytes-total"]["best-acc"], v["wall-s"]["best-ppl"],
                 v["wall-s"]["best-acc"], v["energy-j-total"]["best-ppl"], v["energy-j-total"]["best-acc"]]
                for n, v in res["runs"].items()]
        return head + _table(["run", "ppl @bytes", "acc @bytes", "ppl @wall", "acc @wall",
                              "ppl @energy", "acc @energy"], rows)
    if protocol == "cost-to-target":
        rows = [[n, v["round"], v["bytes"] / 1e6 if v["bytes"] != INF else INF, v["wall-s"],
                 v["energy-j"], v["peak-rss-mb"]] for n, v in res["runs"].items()]
        return (f"Target held-out perplexity: {res['target-ppl']:.3f}\n\n"
                + _table(["run", "round", "MB", "wall s", "energy J", "peak RSS MB"], rows))
    rows = [[n, v["final-ppl"], v["ppl-vs-clean"], v["acc-vs-clean"], v["bytes-vs-clean"],
             v["wall-vs-clean"], v["energy-vs-clean"], v["failed"], v["rejected"]]
            for n, v in res["runs"].items()]
    return (f"Clean final perplexity: {res['clean-final-ppl']:.3f}\n\n"
            + _table(["run", "final ppl", "ppl / clean", "Δacc", "bytes / clean", "wall / clean",
                      "energy / clean", "failed", "rejected"], rows))


def per_round(runs: dict[str, list[dict]]) -> str:
    """One row per run: held-out perplexity after each round (round 0: the start), and the
    mean per round of bytes (both ways), simulated wall-clock and client energy."""
    n = max(len(r) for r in runs.values())
    rows = []
    for name, rs in runs.items():
        last, k = rs[-1], max(len(rs) - 1, 1)
        rows.append([name, " / ".join(f"{r['val-ppl']:.2f}" for r in rs), last.get("mc-acc"),
                     last["bytes-total"] / k / 1e6, last["wall-s"] / k, last["energy-j-total"] / k,
                     max(r.get("peak-rss-mb", 0.0) for r in rs)])
    return _table(["run", f"held-out ppl after rounds 0…{n - 1}", "acc (last)", "MB / round",
                   "wall s / round", "energy J / round", "peak client RSS MB"], rows)


def figures(runs: dict[str, list[dict]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    for key, label, fname in (("bytes-total", "cumulative bytes (MB)", "quality_vs_bytes.png"),
                              ("wall-s", "simulated wall-clock (s)", "quality_vs_wall.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rows in runs.items():
            xs = [r[key] / (1e6 if key == "bytes-total" else 1) for r in rows]
            ax.plot(xs, [r["val-ppl"] for r in rows], marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("global held-out perplexity")
        ax.legend()
        fig.tight_layout()
        p = out / fname
        tmp = p.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        tmp.replace(p)
        paths.append(p)
    return paths


def bench(protocol: str, runs: dict[str, Path], out, clean: str | None = None, **kw) -> dict:
    """Score ``runs`` (name -> run dir) under ``protocol`` (or "all"); write tables + figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {n: load(d) for n, d in runs.items()}
    results = {}
    todo = PROTOCOLS if protocol == "all" else (protocol,)
    if protocol == "all" and clean is None:
        todo = todo[:2]              # robustness needs perturbed runs and their clean one
    for p in todo:
        if p == "quality-under-budget":
            res = quality_under_budget(data, kw.get("budget_bytes"), kw.get("budget_wall"),
                                       kw.get("budget_energy"))
        elif p == "cost-to-target":
            res = cost_to_target(data, kw.get("target_ppl"))
        elif p == "robustness":
            if clean is None or clean not in data:
                raise MobiletuneError("robustness: name the clean run with --clean (one of the runs)")
            res = robustness(data[clean], {n: r for n, r in data.items() if n != clean})
        else:
            raise MobiletuneError(f"protocol {p!r}: expected one of {', '.join(PROTOCOLS)} or all")
        atomic.write_text(out / f"{p}.json", json.dumps(res, indent=1, default=str) + "\n")
        atomic.write_text(out / f"{p}.md", f"# {p}\n\n" + markdown(p, res))
        results[p] = res
    atomic.write_text(out / "rounds.md", "# rounds\n\n" + per_round(data))
    figures(data, out)
    return results
