"""The README's numbers and file tree are checked, never left to drift (DESIGN §9). The file tree and the
reliability text moved to docs/files.md and docs/reliability.md; they are checked there."""

import re
from pathlib import Path

from mmctl import presets

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FILES = (ROOT / "docs" / "files.md").read_text(encoding="utf-8")
RELIABILITY = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")


def test_file_tree_names_every_module():
    tree = FILES.split("# Files", 1)[1]
    for path in sorted((ROOT / "mmctl").rglob("*.py")):
        rel = path.relative_to(ROOT / "mmctl")
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        name = rel.as_posix()
        assert name in tree or rel.name in tree, f"docs/files.md file tree misses mmctl/{name}"


def test_preset_count_and_llama_total():
    assert f"the {len(presets.model_names())} model presets" in README
    assert f"{len(presets.model_names())} named architectures" in README
    from mmctl.accounting import formulas
    from mmctl.accounting.arch import from_hf_config

    arch = from_hf_config(presets.load_model("llama-7b")["config"])
    total = next(int(x.value) for x in formulas.params(arch) if x.key == "params.total")
    assert f'"total": {total}' in README


def test_quick_start_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", README, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_reliability_counts():
    from tests.hostile.checkpoints import CHAT_CASES
    from tests.hostile.checkpoints import cases as checkpoint_cases
    from tests.hostile.recipes import cases as recipe_cases

    assert f"{len(recipe_cases())} hostile recipes" in RELIABILITY
    assert f"{len(checkpoint_cases()) + len(CHAT_CASES)} hostile checkpoint dirs" in RELIABILITY
    from tests.hostile.test_task_files import CASES

    assert f"{len(CASES)} hostile eval task, chat data and prompt files" in RELIABILITY
    from tests.hostile.inputs import cases as input_cases

    assert f"`tests/hostile/test_inputs.py` holds {len(input_cases())} more cases" in RELIABILITY
