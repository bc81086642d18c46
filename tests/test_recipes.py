"""Every shipped recipe loads into its stage's config, and the tiny Makefile runs the tiny recipes."""

import re
from pathlib import Path

import pytest
import yaml

from mmctl.cli import _load

RECIPES = sorted(p for p in (Path(__file__).resolve().parent.parent / "recipes").rglob("*.yaml")
                 if p.name != "floors.yaml")
TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny"


def test_there_are_recipes():
    assert any(p.parent.name == "tiny" for p in RECIPES) and any(p.parent.name == "small" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_loads(path):
    _load(yaml.safe_load(path.read_text())["stage"], str(path), [])  # (rl: the unit its `algorithm` names)


def test_tiny_and_small_recipes_have_the_same_stages():
    tiny = {p.name for p in RECIPES if p.parent.name == "tiny"}
    small = {p.name for p in RECIPES if p.parent.name == "small"}
    assert tiny == small


def makefile_rules(path: Path) -> dict[str, tuple[set[str], list[str]]]:
    """target → (prerequisites, command lines) of a Makefile's explicit rules (continuations joined; the RUNS
    variable expanded, as the report's rule uses it)."""
    text = path.read_text().replace("\\\n", " ")
    runs = re.search(r"^RUNS = (.+)$", text, re.M).group(1).split()
    text = text.replace("$(RUNS:%=out/%/manifest.json)", " ".join(f"out/{r}/manifest.json" for r in runs))
    rules, current = {}, None
    for line in text.splitlines():
        if line.startswith("\t") and current:
            rules[current][1].append(line.strip())
        elif re.match(r"^[\w./-]+:(?!=)", line):
            target, deps = line.split(":", 1)
            current = target.strip()
            rules[current] = (set(deps.split()), [])
        elif not line.startswith("\t"):
            current = None
    return rules


def out_paths(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*map(out_paths, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(out_paths, value)) if value else set()
    return {value} if isinstance(value, str) and value.startswith("out/") else set()


def test_the_tiny_makefile_graph_is_the_recipes_inputs():
    """Each tiny recipe has one rule: its target is the recipe's run.out manifest, its prerequisites the recipe
    and the manifest of every run whose output it reads (base, data, checkpoints, calibration, …) — so make runs a
    stage after its inputs and re-runs it when they change; and the report waits for every run but the draft."""
    rules = makefile_rules(TINY / "Makefile")
    runs = set()
    for recipe_path in sorted(TINY.glob("*.yaml")):
        if recipe_path.name == "floors.yaml":
            continue
        data = yaml.safe_load(recipe_path.read_text())
        out = data["run"]["out"]
        runs.add(out)
        reads = {"/".join(p.split("/")[:2]) for p in out_paths({k: v for k, v in data.items() if k != "run"})}
        target = f"{out}/manifest.json"
        assert target in rules, f"no rule makes {target} ({recipe_path.name})"
        deps, commands = rules[target]
        assert any(recipe_path.name in c.split() for c in commands), f"{target}'s rule does not run {recipe_path.name}"
        assert deps == {recipe_path.name} | {f"{r}/manifest.json" for r in reads}, recipe_path.name
    report = next(deps for target, (deps, _) in rules.items() if target.startswith("out/report/"))
    optional = rules["draft"][0]  # the one run outside the pipeline: speculative decoding's draft model
    assert {f"{r}/manifest.json" for r in runs} - optional | {"floors.yaml"} == report
    assert rules["all"][0] == {next(t for t in rules if t.startswith("out/report/"))}


@pytest.mark.parametrize("path", sorted(TINY.parent.rglob("floors.yaml")), ids=lambda p: p.parent.name)
def test_floors_file_reads(path):
    """The demo's last step reads this file: a YAML slip in a `why:` stops `make demo` after ten minutes."""
    from mmctl.report import floors
    checks = floors.read(path)
    assert checks and all(c.get("why") for c in checks)
