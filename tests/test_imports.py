"""DESIGN §2: imports point down only —
cli → stages → {finetune, rl, evals, report} → {data, models, train, quant, generate, accounting} →
{recipe, artifacts, runtime, tokenizer, presets} → {console, errors}; stages never import each other, models
never import data or train, and train is model-agnostic."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mmctl"
LAYERS = [{"cli", "__main__"}, {"stages"}, {"finetune", "rl", "evals", "report"},
          {"data", "models", "train", "quant", "generate", "speculative", "accounting"},
          {"recipe", "artifacts", "runtime", "tokenizer", "presets"}, {"console", "errors", "__init__"}]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def imports_of(path: Path) -> set[str]:
    """mmctl.<top>[.<sub>] modules imported anywhere in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmctl.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmctl"):
            if node.module == "mmctl":
                found |= {f"mmctl.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def layer_of(module: str) -> str:
    return module.split(".")[1]


def test_imports_point_down():
    problems = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        here = rel.parts[0].removesuffix(".py")
        assert here in LEVEL, f"{rel}: a new top-level module; give it a layer in LAYERS"
        for module in imports_of(path):
            top = layer_of(module)
            if top == "__version__" or top == here:
                continue
            if LEVEL[top] < LEVEL[here]:
                problems.append(f"{rel} imports {module}, a layer above it")
            elif here == "models" and top in ("data", "train"):
                problems.append(f"{rel}: models must not import {module}")
            elif here == "train" and top in ("models", "data"):
                problems.append(f"{rel}: train is model-agnostic, must not import {module}")
        if rel.parts[0] == "stages":
            others = {m for m in imports_of(path) if m.startswith("mmctl.stages.")}
            problems += [f"{rel} imports another stage ({m})" for m in others if m != f"mmctl.stages.{rel.stem}"]
    assert not problems, "\n".join(problems)


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from mmctl.stages import account\nimport mmctl.cli\n")
    assert imports_of(bad) == {"mmctl.stages", "mmctl.cli"}
