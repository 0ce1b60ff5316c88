"""The demo's training recipe is checked-in data: it loads, and typos in it are refused."""

import json
from pathlib import Path

import pytest

from mpq.demo.train import load_recipe, model_dir

RECIPE = Path(__file__).parent.parent / "recipes" / "demo.json"


@pytest.mark.parametrize("name", ["demo", "demo-t5"])
def test_demo_recipe_loads_and_matches_the_shipped_model(name):
    recipe = load_recipe(RECIPE.parent / f"{name}.json")
    folder = model_dir(recipe)
    config = json.loads((folder / "config.json").read_text())
    for key, value in recipe["model"].items():
        assert config[key] == value, key
    assert json.loads((folder / "training.json").read_text())["recipe"] == recipe
    assert config["architectures"] == [{"demo": "LlamaForCausalLM", "demo-t5": "T5ForConditionalGeneration"}[name]]


def test_an_unknown_architecture_is_refused(tmp_path):
    bad = {**json.loads(RECIPE.read_text()), "architecture": "gpt5"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="architecture 'gpt5'; use one of llama, t5"):
        load_recipe(path)


def test_malformed_recipe_is_refused(tmp_path):
    bad = json.loads(RECIPE.read_text())
    bad["trian"] = bad.pop("train")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown recipe keys \\['trian'\\]"):
        load_recipe(path)
