"""benchmarks/levers.py's recipes, checked without training (the sweep itself: test_benchmarks.py)."""

from __future__ import annotations

from conftest import benchmark_module
from deepfake_detector.params import Params, with_overrides


def test_every_lever_recipe_is_valid_params():
    """A recipe's typo fails here, not hours into a sweep."""
    recipes = benchmark_module("levers").RECIPES
    built = {name: with_overrides(Params(), overrides) for name, overrides in recipes.items()}
    assert built["baseline"] == Params()
    assert built["crop"].preprocess.fit == "crop" and built["crop"].train.augment.crop_scale == (1.0, 1.0)
    assert built["patch"].model.channels == (32, 64, 128) and built["scratch+residual"].model.input == "residual"
    assert built["patch"].preprocess.image_size == built["scratch+residual"].preprocess.image_size == 128
    assert len({repr(p) for p in built.values()}) == len(built)  # no two recipes alike
