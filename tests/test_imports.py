"""DESIGN §2: imports point down only —
cli → stages → {finetune, objectives, rl, evals, report, checkpoints} → {data, models, train, quant, generate,
speculative, accounting} → {recipe, artifacts, hf, runtime, tokenizer, presets} → {console, errors}; stages never
import each other, models never import data or train, train is model-agnostic — and nothing imports in a circle,
module by module or package by package (inside a layer too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "mmctl"
LAYERS = [{"cli", "__main__"}, {"stages"}, {"server"},
          {"finetune", "objectives", "rl", "evals", "report", "checkpoints", "session", "batcher"},
          {"data", "models", "train", "quant", "generate", "speculative", "accounting"},
          {"recipe", "artifacts", "hf", "runtime", "tokenizer", "presets"}, {"console", "errors", "__init__"}]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str] | None = None) -> set[str]:
    """mmctl modules imported anywhere in the file (lazy imports included); `from mmctl.x import y` names module
    mmctl.x.y when `modules` holds one of that name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mmctl.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmctl"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if modules is not None and full in modules or node.module == "mmctl" else node.module)
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


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's nodes, each found once (from its smallest node)."""
    found = []

    def walk(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                found.append(path + [nxt])
            elif nxt > path[0] and nxt not in path:
                walk(path + [nxt])

    for node in sorted(graph):
        walk([node])
    return found


def import_graphs(root: Path = ROOT) -> tuple[dict, dict]:
    """(module → the mmctl modules it imports, package → the packages its modules import)."""
    paths = {module_name(p, root): p for p in root.rglob("*.py")}
    modules = {m: imports_of(p, set(paths)) & set(paths) for m, p in paths.items()}
    packages: dict[str, set[str]] = {}
    for m, targets in modules.items():
        for t in targets:
            if layer_of(m) != layer_of(t) and "." in m:
                packages.setdefault(layer_of(m), set()).add(layer_of(t))
    return modules, packages


def test_nothing_imports_in_a_circle():
    modules, packages = import_graphs()
    assert not cycles(modules), cycles(modules)
    assert not cycles(packages), cycles(packages)


def test_the_model_file_is_the_model_only():
    """models/transformer.py imports no quantization, no VLM, no tokenizer: loading is mmctl/checkpoints.py's."""
    imported = imports_of(ROOT / "models" / "transformer.py")
    assert not {m for m in imported if m.startswith(("mmctl.quant", "mmctl.models.vlm", "mmctl.tokenizer"))}


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from mmctl.stages import account\nimport mmctl.cli\n")
    assert imports_of(bad) == {"mmctl.stages", "mmctl.cli"}


def test_the_checker_catches_a_cycle(tmp_path):
    root = tmp_path / "mmctl"
    files = {"data/b.py": "from mmctl.models import a\n", "models/a.py": "",
             "models/c.py": "from mmctl.data import b\n"}
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).parent.joinpath("__init__.py").write_text("")
        (root / name).write_text(body)
    modules, packages = import_graphs(root)
    assert cycles(packages) == [["data", "models", "data"]] and not cycles(modules)  # packages only
    (root / "models" / "a.py").write_text("from mmctl.data import b\n")
    assert cycles(import_graphs(root)[0]) == [["mmctl.data.b", "mmctl.models.a", "mmctl.data.b"]]
