"""The stage run dirs a report reads: which exist, how far each got, and what each logged — read from their files
(`manifest.json`, `recipe.yaml`, `metrics.jsonl`), never by running anything."""

from __future__ import annotations

import json
import math
from calendar import timegm
from dataclasses import dataclass, field
from pathlib import Path
from time import strptime

import yaml

from mmctl.artifacts import LOCK, MANIFEST
from mmctl.errors import DataError, MmctlError

# The curriculum's order, which is the report's; `generate` writes no run dir.
CURRICULUM = ("account", "tokenize", "pretrain", "sft", "rl", "align-vision", "quantize", "eval")


@dataclass
class StageRun:
    """One stage's output dir. status: finished (manifest.json written) | running (its writer holds the lock) |
    unfinished (started, never finished: stopped, killed or failed) | unreadable (a manifest.json that does not
    parse: `problem` says why)."""

    path: Path
    stage: str
    status: str
    manifest: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    problem: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def results(self) -> dict:
        results = self.manifest.get("results")
        return results if isinstance(results, dict) else {}

    @property
    def seconds(self) -> float | None:
        """Wall time from start to finish, from the manifest's timestamps (whole seconds)."""
        try:
            return float(_epoch(self.manifest["finished"]) - _epoch(self.manifest["started"]))
        except (KeyError, TypeError, ValueError):
            return None

    def training(self) -> list[dict]:
        """The training records of metrics.jsonl (a loss at a step), in order."""
        return [r for r in self.metrics if "step" in r and _number(r.get("loss"))]

    def validation(self) -> list[dict]:
        return [r for r in self.metrics if "step" in r and _number(r.get("val_loss"))]


def _epoch(stamp: str) -> int:
    return timegm(strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def find(paths: list[str | Path]) -> list[StageRun]:
    """The stage runs at `paths`: each a stage's output dir, or a dir holding them (as `out/` does), in the
    curriculum's order. A path that does not exist, or holds no stage run, is one line (exit 3)."""
    runs = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise DataError(f"{path}: not a directory")
        if _is_run(path):
            runs.append(read(path))
            continue
        found = [read(p) for p in sorted(path.iterdir()) if p.is_dir() and _is_run(p)]
        if not found:
            raise DataError(f"{path}: no stage run here (a stage's output dir holds recipe.yaml and, once it "
                            "has finished, manifest.json)")
        runs += found
    order = {stage: i for i, stage in enumerate(CURRICULUM)}
    return sorted(runs, key=lambda r: order.get(r.stage, len(order)))  # stable: same stage keeps its path order


def _is_run(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / "recipe.yaml").is_file()


def read(path: Path) -> StageRun:
    manifest, problem = _json(path / MANIFEST) if (path / MANIFEST).is_file() else ({}, "")
    recipe = manifest.get("recipe")
    recipe = recipe if isinstance(recipe, dict) else _yaml(path / "recipe.yaml")
    stage = manifest.get("stage") or recipe.get("stage") or "?"
    status = ("unreadable" if problem else "finished" if manifest else
              "running" if _locked(path / LOCK) else "unfinished")
    return StageRun(path, str(stage), status, manifest, recipe, _jsonl(path / "metrics.jsonl"), problem)


def _json(path: Path) -> tuple[dict, str]:
    """(the object, "") or ({}, why not): one unreadable manifest is shown as such, not the end of the report."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        return {}, f"{path.name} is not readable JSON ({type(e).__name__}: {str(e)[:120]})"
    return (data, "") if isinstance(data, dict) else ({}, f"{path.name} is not a JSON object")


def _yaml(path: Path) -> dict:
    from mmctl.recipe import safe_load

    try:
        data = safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError, RecursionError, MmctlError):
        return {}
    return data if isinstance(data, dict) else {}


def _jsonl(path: Path) -> list[dict]:
    """metrics.jsonl's records with a numeric step; a line cut short by a kill, or not text, is skipped (the log is
    a log, not a result)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and _number(record.get("step", 0)):
            records.append(record)
    return records


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _locked(lock: Path) -> bool:
    """Whether a live process holds the run dir's lock (artifacts.Run takes it for the process's lifetime)."""
    import fcntl

    if not lock.is_file():
        return False
    with open(lock) as f:  # (read access is enough for flock: a read-only copy of the runs works)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def lookup(data, path: str):
    """The value at a dotted `path` into nested dicts, and lists (an item by index, or the item whose `name` it is);
    a key holding dots or slashes goes in brackets: `checkpoints[out/sft/model].tasks.arithmetic.exact_match`,
    `rows[rtn-8bit].perplexity`. None when any step is missing."""
    for key in _split(path):
        if isinstance(data, list):
            named = [d for d in data if isinstance(d, dict) and d.get("name") == key]
            data = named[0] if named else data[int(key)] if key.isdigit() and int(key) < len(data) else None
            if data is None:
                return None
        elif isinstance(data, dict) and key in data:
            data = data[key]
        else:
            return None
    return data


def _split(path: str) -> list[str]:
    keys, current, depth = [], "", 0
    for ch in path:
        if ch == "[" and depth == 0:
            if current:
                keys.append(current)
            current, depth = "", 1
        elif ch == "]" and depth == 1:
            keys.append(current)
            current, depth = "", 0
        elif ch == "." and depth == 0:
            if current:
                keys.append(current)
            current = ""
        else:
            current += ch
    if current:
        keys.append(current)
    return keys
