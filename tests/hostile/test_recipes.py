"""Hostile recipes (tests/hostile/recipes.py): each is one `mmctl validate` in a worker process with an address-
space limit and a per-case time limit. Exit code 2, every stderr line an `error:` line, the first naming the
recipe file; no traceback, no hang, no runaway allocation, and no tagged payload ever executed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.recipes import cases

ROOT = Path(__file__).resolve().parents[2]
CASES = cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-recipes")
    canary = tmp / "CANARY"
    jobs = []
    for i, (name, text, _) in enumerate(CASES):
        path = tmp / f"case{i:03d}.yaml"
        if isinstance(text, str):
            text = text.replace("{canary}", str(canary)).encode("utf-8")
        path.write_bytes(text)
        jobs.append({"name": name, "argv": ["validate", str(path)], "cwd": str(tmp)})
    (tmp / "cases.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-m", "tests.hostile.worker", str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not canary.exists(), "a YAML tag ran code"
    return {r["name"]: r | {"file": f"case{i:03d}.yaml"} for i, r in enumerate(json.loads((tmp / "results.json")
                                                                                           .read_text()))}


def test_the_corpus_is_large():
    assert len(CASES) >= 120


@pytest.mark.parametrize("name, expected", [(name, code) for name, _, code in CASES])
def test_recipe(results, name, expected):
    r = results[name]
    assert r["traceback"] is None, r["traceback"]
    assert r["code"] == expected, r["stderr"]
    assert r["stderr"] and all(line.startswith("error: ") for line in r["stderr"]), r["stderr"]
    assert r["file"] in r["stderr"][0], r["stderr"]
