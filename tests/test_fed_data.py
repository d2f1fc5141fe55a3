"""Federated data: LEAF's Shakespeare split by speaking role and the WordNet Dirichlet split
are deterministic from the seed, disjoint between train and held-out, and non-IID as
intended (a small α gives each client fewer topics); the WordNet multiple-choice items
hold their answer, and their scores come from the bundle's eval."""

import numpy as np
import pytest

from mobiletune.fed import partition as PT
from mobiletune.fed import tasks

PLAY = """ACT I. SCENE I.

Ham.
To be, or not to be: that is the question.

Hor.
[Aside.] My lord,
Nay, good my lord.

[Exeunt.]

Ham.
O, that this too too solid flesh would melt!
"""


def test_roles_are_parsed_from_the_play_layout():
    roles = PT.play_roles(PLAY)
    assert roles == {"Ham": ["To be, or not to be: that is the question.",
                             "O, that this too too solid flesh would melt!"],
                     "Hor": ["Nay, good my lord."]}


def test_shakespeare_roles_are_deterministic_and_held_out_apart():
    from mobiletune import assets
    from tests.helpers import require_asset
    require_asset(assets.text_path, "shakespeare:hamlet")
    a = PT.shakespeare_roles(4, seed=3, top=False)
    b = PT.shakespeare_roles(4, seed=3, top=False)
    c = PT.shakespeare_roles(4, seed=4, top=False)
    assert a == b and [x["name"] for x in a] != [x["name"] for x in c]
    for x in a:
        assert x["val"].strip() and x["val"].strip() not in x["train"]


def test_wordnet_dirichlet_is_seeded_and_non_iid():
    from mobiletune import assets
    from tests.helpers import require_asset
    require_asset(assets.wordnet_nouns)
    a, ga = PT.wordnet_dirichlet(6, 0.1, seed=1, per_client=120)
    b, gb = PT.wordnet_dirichlet(6, 0.1, seed=1, per_client=120)
    assert a == b and ga == gb
    iid, _ = PT.wordnet_dirichlet(6, 100.0, seed=1, per_client=120)
    assert np.mean([len(x["topics"]) for x in a]) < np.mean([len(x["topics"]) for x in iid])
    held = {r["prompt"] for r in ga}
    for x in a:
        assert not held & {r["prompt"] for r in x["train"]}
        assert not {r["prompt"] for r in x["val"]} & {r["prompt"] for r in x["train"]}


def test_multiple_choice_items_and_scores(tmp_path):
    recs = [{"prompt": f"Define w{i}", "response": f"gloss number {i} of a thing"} for i in range(30)]
    items = tasks.build(recs, 10, seed=2)
    assert items == tasks.build(recs, 10, seed=2)
    for it in items:
        word = it["prompt"][len("Define w"):-1]
        assert it["choices"][it["answer"]] == f"gloss number {word} of a thing"
        assert len(set(it["choices"])) == 4
    pytest.importorskip("tensorflow")
    from mobiletune.fed.local import LocalClient
    from tests.fed_helpers import client_texts, fed_bundle
    c = LocalClient(fed_bundle("mono"), [client_texts()[0]], tmp_path / "c", log=lambda m: None)
    mc = tasks.MultipleChoice(items)
    s = mc.scores(c, c.initial_adapter())
    assert len(s) == 10 and all(len(r) == 4 and all(np.isfinite(r)) and min(r) > 0 for r in s)
    # a choice's score is the eval NLL of its tokens: longer glosses of the same words cost more
    acc = mc.accuracy(c, c.initial_adapter())
    assert 0.0 <= acc <= 1.0
