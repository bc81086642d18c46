"""Recipes: the malformed-recipe corpus (every rule of DESIGN §4, each named by file, line and field path), the
type rules, and --set overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import pytest

from mmctl import recipe
from mmctl.errors import UsageError
from mmctl.recipe import option


@dataclass
class Optim:
    lr: float = option(3e-4, "peak learning rate", gt=0)
    warmup: int = option(0, "warmup steps", ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "learning-rate schedule")


@dataclass
class Train:
    steps: int = option(None, "optimizer steps", required=True, ge=1)
    optim: Optim = option(Optim, "optimizer")
    compile: bool = option(False, "torch.compile the model")
    tags: list[str] = option(list, "free-form labels")
    seed: int | None = option(None, "random seed")

    def check(self):
        if self.steps is not None and self.optim.warmup > self.steps:
            return [("optim.warmup", f"{self.optim.warmup} warmup steps exceed train.steps ({self.steps})")]
        return []


@dataclass
class Data:
    path: str = option(None, "corpus file", required=True)
    weights: dict = option(dict, "mixture weights by source")


@dataclass
class Cfg:
    train: Train = option(Train, "training")
    data: Data = option(Data, "data")


GOOD = "train:\n  steps: 100\ndata:\n  path: corpus.txt\n"

# (name, recipe text, [(line or None, fragment), ...]): each expected problem is one line holding the
# fragment (and `recipe.yaml:<line>:` when a line is given); no other problems may be reported.
CORPUS = [
    ("unknown-top-key", "trian:\n  steps: 1\ndata:\n  path: x\n",
     [(1, "trian: unknown key; did you mean `train`?"), (None, "train.steps: missing required value")]),
    ("unknown-nested-key", GOOD + "  # c\ntrain_extra: 1\n", [(6, "train_extra: unknown key")]),
    ("unknown-deep-key", "train:\n  steps: 5\n  optim:\n    lrr: 0.1\ndata:\n  path: x\n",
     [(4, "train.optim.lrr: unknown key; did you mean `lr`?")]),
    ("unknown-key-no-hint", "train:\n  steps: 5\n  zzz: 1\ndata:\n  path: x\n",
     [(3, "train.zzz: unknown key; expected one of: compile, optim, seed, steps, tags")]),
    ("int-given-string", "train:\n  steps: ten\ndata:\n  path: x\n", [(2, "train.steps: expected an integer, got str 'ten'")]),
    ("int-given-float", "train:\n  steps: 2.5\ndata:\n  path: x\n", [(2, "train.steps: expected an integer, got float 2.5")]),
    ("int-given-bool", "train:\n  steps: true\ndata:\n  path: x\n", [(2, "train.steps: expected an integer, got the boolean true")]),
    ("float-given-string", "train:\n  steps: 5\n  optim: {lr: fast}\ndata:\n  path: x\n",
     [(3, "train.optim.lr: expected a number, got str 'fast'")]),
    ("float-given-bool", "train:\n  steps: 5\n  optim: {lr: false}\ndata:\n  path: x\n",
     [(3, "train.optim.lr: expected a number, got the boolean false")]),
    ("bool-given-string", "train:\n  steps: 5\n  compile: 'yes'\ndata:\n  path: x\n",
     [(3, "train.compile: expected true or false, got str 'yes'")]),
    ("str-given-int", "train:\n  steps: 5\ndata:\n  path: 123\n", [(4, "data.path: expected a string, got int 123")]),
    ("missing-required", "train: {}\ndata:\n  path: x\n", [(1, "train.steps: missing required value (optimizer steps)")]),
    ("missing-section", "train:\n  steps: 3\n", [(None, "data.path: missing required value (corpus file)")]),
    ("required-null", "train:\n  steps: null\ndata:\n  path: x\n", [(2, "train.steps: missing required value")]),
    ("range-gt", "train:\n  steps: 5\n  optim:\n    lr: 0\ndata:\n  path: x\n",
     [(4, "train.optim.lr: 0.0 is out of range (must be > 0)")]),
    ("range-ge", "train:\n  steps: 5\n  optim:\n    warmup: -1\ndata:\n  path: x\n",
     [(4, "train.optim.warmup: -1 is out of range (must be ≥ 0)")]),
    ("range-ge-1", "train:\n  steps: 0\ndata:\n  path: x\n", [(2, "train.steps: 0 is out of range (must be ≥ 1)")]),
    ("bad-choice-close", "train:\n  steps: 5\n  optim:\n    schedule: cosin\ndata:\n  path: x\n",
     [(4, "train.optim.schedule: 'cosin' is not one of cosine, wsd, constant; did you mean `cosine`?")]),
    ("bad-choice-far", "train:\n  steps: 5\n  optim:\n    schedule: linear\ndata:\n  path: x\n",
     [(4, "train.optim.schedule: 'linear' is not one of cosine, wsd, constant")]),
    ("conflict", "train:\n  steps: 5\n  optim:\n    warmup: 50\ndata:\n  path: x\n",
     [(4, "train.optim.warmup: 50 warmup steps exceed train.steps (5)")]),
    ("yaml-unclosed", "train: {steps: 5\ndata:\n  path: x\n", [(2, "YAML syntax error")]),
    ("yaml-indent", "train:\n  steps: 5\n   bad: 1\ndata: x\n", [(3, "YAML syntax error")]),
    ("yaml-tab", "train:\n\tsteps: 5\n", [(2, "YAML syntax error")]),
    ("top-level-list", "- train\n- data\n", [(1, "the recipe must be a mapping of sections, got a list")]),
    ("top-level-scalar", "hello\n", [(1, "the recipe must be a mapping of sections, got the value 'hello'")]),
    ("section-scalar", "train: 5\ndata:\n  path: x\n", [(1, "train: expected a mapping of fields, got int 5")]),
    ("subsection-list", "train:\n  steps: 5\n  optim: [1, 2]\ndata:\n  path: x\n",
     [(3, "train.optim: expected a mapping of fields, got a list")]),
    ("list-given-scalar", "train:\n  steps: 5\n  tags: foo\ndata:\n  path: x\n",
     [(3, "train.tags: expected a list, got str 'foo'")]),
    ("list-element-type", "train:\n  steps: 5\n  tags: [a, 1]\ndata:\n  path: x\n",
     [(3, "train.tags[1]: expected a string, got int 1")]),
    ("dict-given-list", "train:\n  steps: 5\ndata:\n  path: x\n  weights: [1]\n",
     [(5, "data.weights: expected a mapping, got a list")]),
    ("duplicate-key", "train:\n  steps: 5\ntrain:\n  steps: 6\ndata:\n  path: x\n",
     [(3, "train: duplicate key (first on line 1)")]),
    ("duplicate-nested-key", "train:\n  steps: 5\n  steps: 6\ndata:\n  path: x\n",
     [(3, "train.steps: duplicate key (first on line 2)")]),
    ("non-string-key", "1: x\n" + GOOD, [(1, "recipe: keys must be strings, got 1")]),
    ("many-at-once", "train:\n  steps: 0\n  optim:\n    lr: -1\n    schedule: nope\n  colour: red\ndata:\n  path: 7\n",
     [(2, "train.steps: 0 is out of range"), (4, "train.optim.lr: -1.0 is out of range"),
      (5, "train.optim.schedule: 'nope' is not one of"), (6, "train.colour: unknown key"),
      (8, "data.path: expected a string")]),
    ("wrong-stage", "stage: pretrain\n" + GOOD, [(1, "stage: this recipe is for `mmctl pretrain`, not `mmctl sft`")]),
    ("empty-file", "", [(None, "train.steps: missing required value"), (None, "data.path: missing required value")]),
]


def problems_of(text: str, tmp_path, overrides=(), stage="sft") -> list[str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        recipe.load(path, Cfg, overrides, stage=stage)
    return e.value.problems


@pytest.mark.parametrize("name, text, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_malformed_recipe_corpus(name, text, expected, tmp_path):
    problems = problems_of(text, tmp_path)
    assert len(problems) == len(expected), problems
    for line, fragment in expected:
        hits = [p for p in problems if fragment in p]
        assert hits, f"{fragment!r} not in {problems}"
        prefix = f"{tmp_path / 'recipe.yaml'}:{line}:" if line else f"{tmp_path / 'recipe.yaml'}"
        assert hits[0].startswith(prefix), hits[0]
        assert "\n" not in hits[0]


def test_corpus_is_large_enough():
    assert len(CORPUS) + 6 >= 30  # plus the file and --set cases below


def test_missing_file_directory_and_binary(tmp_path):
    for path, fragment in ((tmp_path / "nope.yaml", "recipe not found"), (tmp_path, "not a file")):
        with pytest.raises(UsageError, match=fragment):
            recipe.load(path, Cfg)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    with pytest.raises(UsageError, match="cannot read recipe"):
        recipe.load(binary, Cfg)


def test_set_overrides_are_typed_and_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    cfg = recipe.load(path, Cfg, ["train.optim.lr=1e-3", "train.tags=[a, b]", "train.seed=7", "train.steps=9"])
    assert (cfg.train.optim.lr, cfg.train.tags, cfg.train.seed, cfg.train.steps) == (1e-3, ["a", "b"], 7, 9)
    assert problems_of(GOOD, tmp_path, ["train.optim.lrr=1"]) == [
        "--set: train.optim.lrr: unknown key; did you mean `lr`?"]
    assert problems_of(GOOD, tmp_path, ["train.steps=many"]) == [
        "--set: train.steps: expected an integer, got str 'many'"]
    with pytest.raises(UsageError, match="expected KEY.PATH=VALUE"):
        recipe.load(path, Cfg, ["train.steps"])
    with pytest.raises(UsageError, match="train.steps is not a section"):
        recipe.load(path, Cfg, ["train.steps.x=1"])


def test_set_reaches_into_a_list_item():
    from pathlib import Path

    from mmctl.stages.align_vision import AlignVisionRecipe

    path = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "align-vision.yaml"
    cfg = recipe.load(path, AlignVisionRecipe, ["phases[0].train.steps=7", "phases[-1].sources[0].items=9",
                                                "phases[-1].trainable={language_model: 0.5}"], stage="align-vision")
    assert (cfg.phases[0].train.steps, cfg.phases[-1].sources[0].items) == (7, 9) and len(cfg.phases) == 2
    assert cfg.phases[-1].trainable == {"language_model": 0.5}
    for override, message in (("phases[3].name=x", "phases has no item 3"), ("phases[a].name=x", "NAME or NAME[INDEX]"),
                              ("vision[0].x=1", "vision has no item 0"), ("phases[0].name.x=1", "not a section"),
                              ("phases[0].sources[0].items.x=1", "not a section")):
        with pytest.raises(UsageError, match=re.escape(message)):
            recipe.load(path, AlignVisionRecipe, [override], stage="align-vision")


def test_floats_without_a_dot_and_ints_for_floats(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  steps: 5\n  optim:\n    lr: 3e-4\n    warmup: 0\ndata:\n  path: x\n")
    assert recipe.load(path, Cfg).train.optim.lr == 3e-4
    path.write_text("train:\n  steps: 5\n  optim:\n    lr: 1\ndata:\n  path: x\n")
    lr = recipe.load(path, Cfg).train.optim.lr
    assert lr == 1.0 and isinstance(lr, float)


def test_resolved_recipe_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    cfg = recipe.load(path, Cfg, ["train.optim.schedule=wsd"])
    again = tmp_path / "again.yaml"
    again.write_text(recipe.dump(cfg, "sft"))
    assert recipe.load(again, Cfg, stage="sft") == cfg


def test_every_field_is_documented():
    import importlib

    from mmctl.cli import STAGES

    units = [u for unit in STAGES.values() for u in (unit.values() if isinstance(unit, dict) else [unit])]
    for module, cls in units:
        for path, _, _, doc in recipe.describe(getattr(importlib.import_module(module), cls)):
            assert doc, f"{module}.{cls}: {path} has no doc"
