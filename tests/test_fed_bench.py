"""The three protocols on hand-written metrics logs with known answers (the numbers below
are worked out by hand), and the figures written."""

import json

import pytest

from mobiletune.fed.bench import bench


def write(d, rows):
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def rows(ppls, bytes_per_round, wall, energy, method="fedavg", failed=0):
    out, b, w, e = [], 0, 0.0, 0.0
    for i, p in enumerate(ppls):
        out.append({"round": i, "method": method, "val-ppl": p, "mc-acc": 0.25 + 0.05 * i,
                    "bytes-total": b, "wall-s": w, "energy-j-total": e, "peak-rss-mb": 100.0 + i,
                    "failed": [{}] * (failed if i else 0)})
        b, w, e = b + bytes_per_round, w + wall, e + energy
    return out


def test_protocols_on_known_logs(tmp_path):
    runs = {"fedavg": write(tmp_path / "a", rows([50, 40, 30, 20], 100, 10.0, 5.0)),
            "ffa": write(tmp_path / "b", rows([50, 45, 35, 28], 50, 8.0, 4.0)),
            "local": write(tmp_path / "c", rows([50, 42, 38, 36], 0, 6.0, 3.0, "local-only"))}
    res = bench("all", runs, tmp_path / "out", clean="fedavg")
    q = res["quality-under-budget"]
    # default budgets: the smallest nonzero final total: 150 B (ffa), 18 s (local), 9 J (local)
    assert q["budgets"] == {"bytes-total": 150, "wall-s": 18.0, "energy-j-total": 9.0}
    assert q["runs"]["fedavg"]["bytes-total"]["best-ppl"] == 40      # rounds 0-1 fit 150 B
    assert q["runs"]["ffa"]["bytes-total"]["best-ppl"] == 28
    assert q["runs"]["fedavg"]["wall-s"]["best-ppl"] == 40           # 0, 10 s fit; 20 s does not
    assert q["runs"]["local"]["energy-j-total"]["best-ppl"] == 36
    c = res["cost-to-target"]
    assert c["target-ppl"] == 36                                      # the local-only final
    assert c["runs"]["fedavg"] == {"round": 2, "bytes": 200.0, "wall-s": 20.0, "energy-j": 10.0,
                                   "peak-rss-mb": 102.0}
    assert c["runs"]["ffa"]["round"] == 2 and c["runs"]["ffa"]["bytes"] == 100.0
    r = res["robustness"]
    assert r["runs"]["ffa"]["ppl-vs-clean"] == pytest.approx(28 / 20)
    for f in ("quality-under-budget.md", "cost-to-target.md", "robustness.md",
              "quality_vs_bytes.png", "quality_vs_wall.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    # per round: fedavg's 3 rounds spent 300 B, 30 s, 15 J -> 1e-4 MB, 10 s, 5 J a round
    line = next(x for x in (tmp_path / "out" / "rounds.md").read_text().splitlines()
                if x.startswith("| fedavg"))
    assert line == "| fedavg | 50.00 / 40.00 / 30.00 / 20.00 | 0.400 | 0.000 | 10.000 | 5.000 | 103.000 |"


def test_all_without_perturbed_runs_scores_the_other_protocols(tmp_path):
    runs = {"a": write(tmp_path / "a", rows([50, 40], 10, 1.0, 1.0)),
            "b": write(tmp_path / "b", rows([50, 45], 5, 1.0, 1.0))}
    res = bench("all", runs, tmp_path / "o")
    assert set(res) == {"quality-under-budget", "cost-to-target"}
    assert not (tmp_path / "o" / "robustness.md").exists()


def test_a_target_never_reached_is_infinite(tmp_path):
    runs = {"a": write(tmp_path / "a", rows([50, 40], 10, 1.0, 1.0))}
    res = bench("cost-to-target", runs, tmp_path / "o", target_ppl=5.0)
    assert res["cost-to-target"]["runs"]["a"]["bytes"] == float("inf")
    assert "∞" in (tmp_path / "o" / "cost-to-target.md").read_text()
