"""A multiple-choice task from shipped data, scored as EdgeFlowerTune scores BoolQ/PIQA/ARC:
WordNet, "Define <term>:" with four glosses (the term's own and three of other, seeded
synsets); the model's answer is the choice with the highest log-likelihood (summed NLL of
the choice's tokens given the prompt, lm-eval's ``acc``), scored with the bundle's ``eval``
signature on the phone's runtime. Accuracy is reported beside perplexity; chance is 0.25.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mobiletune.fed import adapter as W
from mobiletune.io import atomic


def build(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` items from WordNet records (``prompt`` "Define X", ``response`` the gloss)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(records))
    items = []
    for i in idx[:n]:
        r = records[i]
        others = [records[j]["response"] for j in rng.choice(len(records), 8, replace=False)
                  if records[j]["response"] != r["response"]][:3]
        choices = others + [r["response"]]
        order = rng.permutation(4)
        items.append({"prompt": r["prompt"] + ":", "choices": [choices[k] for k in order],
                      "answer": int(np.where(order == 3)[0][0])})
    return items


def write(path, items: list[dict]) -> Path:
    atomic.write_text(path, "".join(json.dumps(x) + "\n" for x in items))
    return Path(path)


@dataclass
class MultipleChoice:
    items: list

    @classmethod
    def read(cls, path, n: int | None = None) -> "MultipleChoice":
        items = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x]
        return cls(items[:n] if n else items)

    def scores(self, client, wire: dict) -> list[list[float]]:
        """Summed NLL of every choice of every item under ``wire`` (a ``LocalClient``'s
        runner; its state is restored afterwards)."""
        from mobiletune.runtime.tokenizer import Tokenizer
        r, m = client.runner, client.m
        tok = Tokenizer.from_dir(client.bundle)
        keep = {k: np.array(v) for k, v in r.get_state().items()}
        r.set_state({**keep, **W.to_state_names(W.validate(wire, client.expected))})
        k, t = min(m.variants), m.seq_len
        out = []
        try:
            for it in self.items:
                p = tok.encode(it["prompt"])
                row = []
                for ch in it["choices"]:
                    c = tok.encode(" " + ch)
                    ids = (p + c)[-(t + 1):]                       # keep the choice's end
                    n_choice = min(len(c), len(ids) - 1)
                    b = {"inputs": np.zeros((k, t), np.int32), "targets": np.zeros((k, t), np.int32),
                         "loss_mask": np.zeros((k, t), np.float32)}
                    L = len(ids) - 1
                    b["inputs"][0, :L], b["targets"][0, :L] = ids[:-1], ids[1:]
                    b["loss_mask"][0, L - n_choice:L] = 1.0
                    nll, _ = r.eval(b)
                    row.append(float(nll))
                out.append(row)
        finally:
            r.set_state(keep)
        return out

    def accuracy(self, client, wire: dict) -> float:
        s = self.scores(client, wire)
        return float(np.mean([int(np.argmin(row)) == it["answer"] for row, it in zip(s, self.items)]))
