"""Named architectures and accelerators, stored as data.

`models/<name>.yaml` holds a Hugging Face `config.json` (field names and values as published) under
`config:`, with the repository it came from; `hardware.yaml` holds accelerators' dense peak FLOP/s, memory
and bandwidth. Adding a preset is adding a file: no code changes.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

from mmctl.errors import UsageError
from mmctl.recipe import safe_load

HERE = Path(__file__).parent


def model_names() -> list[str]:
    return sorted(p.stem for p in (HERE / "models").glob("*.yaml"))


def model_path(name: str) -> Path:
    return HERE / "models" / f"{name}.yaml"


@cache
def load_model(name: str) -> dict:
    """The preset as a dict with `description`, `source` and `config` (the HF config.json fields)."""
    path = model_path(name)
    if name not in model_names():
        raise UsageError(f"unknown model preset {name!r}{did_you_mean(name, model_names())}; "
                         "`mmctl account --list` shows them")
    return safe_load(path.read_text(encoding="utf-8"))


@cache
def hardware() -> dict[str, dict]:
    return safe_load((HERE / "hardware.yaml").read_text(encoding="utf-8"))


def load_hardware(name: str) -> dict:
    table = hardware()
    if name not in table:
        raise UsageError(f"unknown GPU {name!r}{did_you_mean(name, list(table))}; `mmctl account --list` shows them")
    return table[name]


def did_you_mean(name: str, names: list[str]) -> str:
    """A hint naming the closest of `names`: one that starts with what was typed first (`h100` → `h100-sxm`), then
    the most similar spelling."""
    started = sorted((n for n in names if n.startswith(name.lower())), key=lambda n: (len(n), n))
    hint = started[:1] or difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
    return f"; did you mean `{hint[0]}`?" if hint else ""
