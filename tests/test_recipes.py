"""Every shipped recipe loads into its stage's config, and the tiny Makefile runs the tiny recipes."""

import importlib
from pathlib import Path

import pytest
import yaml

from mmctl import recipe
from mmctl.cli import STAGES

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.parent.name == "tiny" for p in RECIPES) and any(p.parent.name == "small" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads(path):
    stage = yaml.safe_load(path.read_text())["stage"]
    module, cls = STAGES[stage]
    recipe.load(path, getattr(importlib.import_module(module), cls), stage=stage)


def test_tiny_and_small_recipes_have_the_same_stages():
    tiny = {p.name for p in RECIPES if p.parent.name == "tiny"}
    small = {p.name for p in RECIPES if p.parent.name == "small"}
    assert tiny == small
