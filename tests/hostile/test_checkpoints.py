"""Hostile checkpoint dirs (tests/hostile/checkpoints.py): each case mutates a copy of a valid checkpoint, then
`mmctl generate` and `mmctl eval` (and `mmctl account` for config.json cases) run on it in a worker process with
an address-space limit and a per-case time limit. The expected exit code, `error:` lines only, the first naming
the checkpoint dir; no traceback, no hang, no runaway allocation, nothing executed, nothing read outside."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hostile.checkpoints import CHAT_CASES, cases

ROOT = Path(__file__).resolve().parents[2]
CASES = cases()


def commands(name: str, ckpt: str, out: str) -> dict[str, list[str]]:
    runs = {"generate": ["generate", ckpt, "-p", "Once upon", "--max-new-tokens", "2"],
            "eval": ["eval", ckpt, "--task", "stories-mc", "--limit", "2", "--out", out]}
    if name.startswith("config:"):
        runs["account"] = ["account", ckpt]
    return runs


@pytest.fixture(scope="module")
def results(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-ckpt")
    jobs, expected = [], {}
    for i, (name, mutate, code) in enumerate(CASES + [(n, m, c) for n, m, c in CHAT_CASES]):
        case_dir, outside = tmp / f"case{i:03d}", tmp / f"outside{i:03d}"
        outside.mkdir()
        shutil.copytree(checkpoint, case_dir)
        mutate(case_dir, outside)
        runs = commands(name, str(case_dir), str(tmp / f"eval{i:03d}"))
        if (name, mutate, code) in CHAT_CASES:
            runs = {"generate --chat": runs["generate"] + ["--chat"]}
        for command, argv in runs.items():
            jobs.append({"name": f"{name} [{command}]", "argv": argv, "cwd": str(tmp)})
            # account reads only the fields it counts with (and transformers' defaults for absent ones): any clean
            # outcome will do there, so long as it is one
            expected[f"{name} [{command}]"] = (None if command == "account" else code, f"case{i:03d}")
    (tmp / "cases.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-m", "tests.hostile.worker", str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp.rglob("CANARY")), "a hostile input ran code"
    return {r["name"]: (r, *expected[r["name"]]) for r in json.loads((tmp / "results.json").read_text())}


def test_the_corpus_is_large():
    assert len(CASES) + len(CHAT_CASES) >= 80


NAMES = [f"{name} [{command}]" for name, _, _ in CASES
         for command in (["generate", "eval"] + (["account"] if name.startswith("config:") else []))]
NAMES += [f"{name} [generate --chat]" for name, _, _ in CHAT_CASES]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint(results, name):
    r, code, case_dir = results[name]
    assert r["traceback"] is None, r["traceback"]
    if code is None and r["code"] == 0:
        return
    assert r["code"] == code if code is not None else r["code"] in (2, 3), r["stderr"]
    assert r["stderr"] and all(line.startswith("error: ") for line in r["stderr"]), r["stderr"]
    assert case_dir in r["stderr"][0], r["stderr"]
