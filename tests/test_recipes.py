"""The shipped recipes load, resolve their data, and run (on a small model) end to end."""

import json
from pathlib import Path

import pytest

from mobiletune import assets
from mobiletune.assets.wordnet import definitions
from mobiletune.cli import main
from mobiletune.train.recipe import apply_overrides, load_recipe
from mobiletune.train.trainer import resolve_data
from tests.helpers import require_asset
from tests.tiny import tiny_gpt2_dir

ALL = sorted(Path(__file__).parent.parent.glob("recipes/*.py"))
FED = [p for p in ALL if p.stem.endswith("_fed")]  # recipe + fed = FedConfig(...): data per client
RECIPES = [p for p in ALL if p not in FED]


def test_the_recipes_are_all_here():
    assert {p.stem for p in ALL} == {"smollm2_shakespeare_lora", "gemma3_wordnet_lora",
                                     "gpt2_full", "gpt2_lora", "qwen25_lora",
                                     "smollm2_shakespeare_side", "smollm2_shakespeare_side_cut",
                                     "smollm2_shakespeare_fed"}


@pytest.mark.parametrize("path", FED, ids=lambda p: p.stem)
def test_federated_recipe_loads_with_its_federation(path):
    pytest.importorskip("flwr")
    from mobiletune.fed.recipe import FedConfig, load
    r, f = load(path)
    assert isinstance(f, FedConfig) and f.clients >= 1 and r.lora is not None


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_resolves_its_data(path):
    r = load_recipe(path)
    if "wordnet:define" in r.data:
        require_asset(assets.wordnet_nouns)
    else:
        for spec in r.data + r.val_data:
            require_asset(assets.text_path, spec)
    files = resolve_data(r.data + r.val_data)
    assert files and all(f.is_file() for f in files)
    assert apply_overrides(r, ["steps=2"]).steps == 2


@pytest.mark.parametrize("name", ["gpt2_full", "smollm2_shakespeare_lora"])
def test_recipe_runs_on_a_small_model(name, tmp_path):
    model = tiny_gpt2_dir(tmp_path / "m")
    out = tmp_path / "out"
    path = next(p for p in RECIPES if p.stem == name)
    assert main(["train", str(path), "--out", str(out), "--set", f"model={model}",
                 "--set", "steps=2", "--set", "seq_len=32", "--set", "eval_batches=1",
                 "--set", "lora.target_modules=c_attn" if "lora" in name else "seed=1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] and s["step"] == 2


def test_wordnet_definitions_parse_terms_and_glosses():
    require_asset(assets.wordnet_nouns)
    recs = definitions(assets.wordnet_nouns())
    assert len(recs) > 80000
    assert recs[0] == {"prompt": "Define entity", "response": "that which is perceived or known "
                       "or inferred to have its own distinct existence (living or nonliving)"}
    assert all('; "' not in r["response"] and "_" not in r["prompt"] for r in recs[:2000])
