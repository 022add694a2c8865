import pytest

from fastmnist.model import LAYOUTS
from fastmnist.recipes import RECIPES, describe
from fastmnist.train import TrainConfig


def test_every_model_has_a_recipe_that_meets_the_assignment():
    assert set(RECIPES) == set(LAYOUTS)
    for recipe in RECIPES.values():
        assert recipe["epochs"] < 20  # docs/assignment.md
    assert RECIPES["default"]["epochs"] <= 10 and RECIPES["reference"]["epochs"] <= 15
    assert RECIPES["tiny"]["epochs"] <= 15


def test_every_recipe_evaluates_and_saves_bn_statistics_of_the_weights_it_saves():
    """The weight average's own BN statistics are stale (issue 22's dip); every recipe recomputes them
    (tests/test_train.py checks that the recomputation makes model.pt's statistics its weights')."""
    for name, recipe in RECIPES.items():
        assert recipe["bn_recompute_batches"] > 0 and recipe["ema_decay"] > 0, name


def test_each_model_gets_its_recipe_and_flags_override_it():
    for name, recipe in RECIPES.items():
        cfg = TrainConfig(model=name)
        assert {k: getattr(cfg, k) for k in recipe} == recipe
    cfg = TrainConfig(model="tiny", epochs=3, ema_decay=0.0)
    assert (cfg.epochs, cfg.ema_decay, cfg.lr) == (3, 0.0, RECIPES["tiny"]["lr"])
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        TrainConfig(model="huge")


def test_help_names_each_models_value_where_they_differ(monkeypatch):
    monkeypatch.setitem(RECIPES, "tiny", {**RECIPES["tiny"], "epochs": 99})
    text = describe("epochs")
    assert text.startswith(str(RECIPES["default"]["epochs"])) and "tiny: 99" in text
    assert describe("batch_size") == str(RECIPES["default"]["batch_size"])  # the same everywhere: one value
