"""Federated data splits, deterministic from a seed, written beside the run
(``RUN/partition/``; ``partition.json`` says what each client got).

* ``shakespeare_roles``: LEAF's Shakespeare split — every speaking role of every shipped
  play is a user whose text is its speeches (non-IID by construction). Clients are the
  ``n`` roles with the most text (ties by name), or a seeded sample of the roles with at
  least ``min_chars``; each role's last ``val_fraction`` of speeches is its held-out split,
  and the global held-out set is the union of the clients' held-out splits (LEAF's test set).
* ``wordnet_dirichlet``: the WordNet "Define X" instruction set split by topic (the
  lexicographer file, e.g. noun.animal, 26 classes) with Dirichlet(α) proportions per class
  (Hsu et al. 2019): small α, few topics per client. Per-client held-out: a seeded
  ``val_fraction`` of each client's terms; the global held-out set: ``global_val`` terms no
  client trains on (a term's senses stay on one side).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mobiletune.errors import MobiletuneError
from mobiletune.io import atomic

_SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}\.$")


def play_roles(text: str) -> dict[str, list[str]]:
    """role -> speeches, from a Gutenberg play: a speech is a block after a blank line whose
    first line is the speaker's name (``Ham.``) and whose other lines are the speech."""
    roles: dict[str, list[str]] = {}
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = block.strip("\n").split("\n")
        if len(lines) < 2 or not _SPEAKER.match(lines[0].strip()):
            continue
        speech = "\n".join(x for x in lines[1:] if not x.lstrip().startswith("["))
        if speech.strip():
            roles.setdefault(lines[0].strip()[:-1], []).append(speech)
    return roles


def shakespeare_roles(n: int, seed: int = 0, val_fraction: float = 0.1, min_chars: int = 4000,
                      plays: list[str] | None = None, top: bool = True) -> list[dict]:
    """``n`` clients: ``{"name": "<play>/<role>", "train": str, "val": str}``."""
    from mobiletune import assets
    names = plays or assets.shakespeare_plays()
    users = []
    for play in names:
        for role, speeches in play_roles(assets.read_text(f"shakespeare:{play}")).items():
            if sum(map(len, speeches)) >= min_chars and len(speeches) >= 10:
                users.append((f"{play}/{role}", speeches))
    if len(users) < n:
        raise MobiletuneError(f"shakespeare: {len(users)} roles have >= {min_chars} characters; "
                              f"{n} clients asked for")
    users.sort(key=lambda u: (-sum(map(len, u[1])), u[0]) if top else u[0])
    if top:
        chosen = users[:n]
    else:
        rng = np.random.default_rng(seed)
        chosen = [users[i] for i in sorted(rng.choice(len(users), n, replace=False))]
    out = []
    for name, sp in chosen:
        k = max(1, int(round(len(sp) * val_fraction)))
        out.append({"name": name, "train": "\n\n".join(sp[:-k]) + "\n", "val": "\n\n".join(sp[-k:]) + "\n"})
    return out


def wordnet_records() -> list[dict]:
    """Every WordNet noun synset as ``{"prompt", "response", "topic"}`` (lexicographer file)."""
    from mobiletune import assets
    from mobiletune.assets.wordnet import definitions
    path = assets.wordnet_nouns()
    recs = definitions(path)
    topics = [int(line.split()[1]) for line in path.read_text(encoding="utf-8").splitlines()
              if not line.startswith("  ") and "|" in line
              and line.split("|", 1)[1].strip().split('; "')[0].strip().rstrip(";").strip()]
    assert len(topics) == len(recs)
    return [{**r, "topic": t} for r, t in zip(recs, topics)]


def wordnet_dirichlet(n: int, alpha: float, seed: int = 0, per_client: int = 200,
                      val_fraction: float = 0.1, global_val: int = 200) -> tuple[list[dict], list[dict]]:
    """(clients, global held-out records); clients are ``{"name", "train", "val", "topics"}``
    with record lists."""
    rng = np.random.default_rng(seed)
    recs = wordnet_records()
    terms = sorted({r["prompt"] for r in recs})          # a term's senses stay together
    held = {terms[i] for i in rng.permutation(len(terms))[:global_val]}
    gval = [r for r in recs if r["prompt"] in held]
    pool = [r for r in recs if r["prompt"] not in held]
    by_topic: dict[int, list] = {}
    for r in pool:
        by_topic.setdefault(r["topic"], []).append(r)
    clients = [[] for _ in range(n)]
    for t in sorted(by_topic):
        items = by_topic[t][: n * per_client // max(1, len(by_topic)) * 4]
        p = rng.dirichlet([alpha] * n)
        cuts = (np.cumsum(p)[:-1] * len(items)).astype(int)
        for c, part in enumerate(np.split(np.arange(len(items)), cuts)):
            clients[c].extend(items[i] for i in part)
    out = []
    for c, items in enumerate(clients):
        items = [items[i] for i in rng.permutation(len(items))][:per_client]
        if len(items) < 4:
            raise MobiletuneError(f"wordnet: client {c} got {len(items)} records (alpha={alpha}); "
                                  f"raise alpha or per_client")
        mine = sorted({r["prompt"] for r in items})
        k = max(1, int(round(len(mine) * val_fraction)))
        vt = {mine[i] for i in rng.permutation(len(mine))[:k]}
        topics = sorted({r["topic"] for r in items})
        out.append({"name": f"wordnet-{c}", "train": [r for r in items if r["prompt"] not in vt],
                    "val": [r for r in items if r["prompt"] in vt], "topics": topics})
    return out, gval


def _jsonl(recs) -> str:
    return "".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n" for r in recs)


def write(run, clients: list[dict], global_val, kind: str, meta: dict) -> Path:
    """``RUN/partition/``: client-NNN/train.<kind>, val.<kind>, global_val.<kind>, partition.json."""
    d = Path(run) / "partition"
    fmt = (lambda x: x) if kind == "txt" else _jsonl
    summary = []
    for i, c in enumerate(clients):
        cd = d / f"client-{i:03d}"
        atomic.write_text(cd / f"train.{kind}", fmt(c["train"]))
        atomic.write_text(cd / f"val.{kind}", fmt(c["val"]))
        summary.append({"client": i, "name": c["name"], "train": len(c["train"]), "val": len(c["val"]),
                        **({"topics": c["topics"]} if "topics" in c else {})})
    gv = global_val if global_val is not None else "\n\n".join(c["val"] for c in clients)
    atomic.write_text(d / f"global_val.{kind}", fmt(gv))
    atomic.write_text(d / "partition.json", json.dumps({**meta, "clients": summary}, indent=1) + "\n")
    return d
