"""The demo's training recipe is checked-in data: it loads, and typos in it are refused."""

import json
from pathlib import Path

import pytest

from mpq.demo.train import load_recipe

RECIPE = Path(__file__).parent.parent / "recipes" / "demo.json"


def test_demo_recipe_loads_and_matches_the_shipped_model():
    recipe = load_recipe(RECIPE)
    from mpq.models import DEMO_DIR

    config = json.loads((DEMO_DIR / "config.json").read_text())
    for key, value in recipe["model"].items():
        assert config[key] == value, key
    assert json.loads((DEMO_DIR / "training.json").read_text())["recipe"] == recipe


def test_malformed_recipe_is_refused(tmp_path):
    bad = json.loads(RECIPE.read_text())
    bad["trian"] = bad.pop("train")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown recipe keys \\['trian'\\]"):
        load_recipe(path)
