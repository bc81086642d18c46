"""Hostile eval task files, chat data files and prompt files: jsonl items and task YAML that are malformed,
mistyped, binary or dangerous. `mmctl eval` / `sft` / `generate` end in the expected exit code with one line naming
the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MC = '{"context": "a", "choices": ["x", "y"], "answer": 0}'
GEN = '{"prompt": "1 + 1 =", "answer": 2}'
CASES = [  # (name, file name, content, argv after the checkpoint, exit code)
    ("mc-not-json", "t.jsonl", MC + "\n{oops\n", ["--task", "mc", "--data"], 3),
    ("mc-list", "t.jsonl", "[1, 2]\n", ["--task", "mc", "--data"], 3),
    ("mc-missing-answer", "t.jsonl", '{"context": "a", "choices": ["x", "y"]}\n', ["--task", "mc", "--data"], 3),
    ("mc-answer-out-of-range", "t.jsonl", '{"context": "a", "choices": ["x", "y"], "answer": 5}\n',
     ["--task", "mc", "--data"], 3),
    ("mc-answer-bool", "t.jsonl", '{"context": "a", "choices": ["x", "y"], "answer": true}\n',
     ["--task", "mc", "--data"], 3),
    ("mc-one-choice", "t.jsonl", '{"context": "a", "choices": ["x"], "answer": 0}\n', ["--task", "mc", "--data"], 3),
    ("mc-choices-numbers", "t.jsonl", '{"context": "a", "choices": [1, 2], "answer": 0}\n',
     ["--task", "mc", "--data"], 3),
    ("mc-binary", "t.jsonl", b"\xff\xfe\x00\x01garbage\n", ["--task", "mc", "--data"], 3),
    ("mc-empty", "t.jsonl", "\n\n", ["--task", "mc", "--data"], 3),
    ("mc-deep", "t.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", ["--task", "mc", "--data"], 3),
    ("gen-prompt-number", "t.jsonl", '{"prompt": 5, "answer": 2}\n', ["--task", "gen", "--data"], 3),
    ("gen-answer-list", "t.jsonl", '{"prompt": "x", "answer": [2]}\n', ["--task", "gen", "--data"], 3),
    ("ppl-field-missing", "t.jsonl", '{"body": "x"}\n', ["--task", "ppl", "--data"], 3),
    ("ppl-binary-text", "t.txt", b"\xff\xfe text", ["--task", "ppl", "--data"], 3),
    ("task-yaml-tag", "t.yaml", "kind: !!python/object/apply:os.system ['touch CANARY']\n", ["--task"], 2),
    ("task-yaml-duplicate", "t.yaml", "kind: generation\ndata: x.jsonl\nkind: perplexity\n", ["--task"], 2),
    ("task-yaml-unknown-key", "t.yaml", "kind: generation\ndata: x.jsonl\nextrakt: hashes\n", ["--task"], 2),
    ("task-yaml-syntax", "t.yaml", "kind: [\n", ["--task"], 2),
    ("task-yaml-binary", "t.yaml", b"kind: \xff\n", ["--task"], 2),
    ("task-yaml-list", "t.yaml", "- kind\n", ["--task"], 2),
    ("task-yaml-bad-regex", "t.yaml", "kind: generation\ndata: x.jsonl\nextract: 'regex:('\n", ["--task"], 2),
    ("chat-not-json", "c.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n', ["sft"], 3),
    ("chat-no-assistant", "c.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n', ["sft"], 3),
    ("chat-bad-role", "c.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n', ["sft"], 3),
    ("chat-unknown-format", "c.jsonl", '{"text": "x"}\n', ["sft"], 3),
    ("chat-reserved-character", "c.jsonl", '{"prompt": "\\ue000", "completion": "b"}\n', ["sft"], 3),
    ("chat-binary", "c.jsonl", b"\xff\xfe\n", ["sft"], 3),
    ("prompts-not-json", "p.jsonl", '{"prompt": "a"}\n{oops\n', ["--prompts"], 3),
    ("prompts-no-field", "p.jsonl", '{"text": "a"}\n', ["--prompts"], 3),
    ("prompts-binary", "p.txt", b"\xff\xfe\n", ["--prompts"], 3),
]


@pytest.fixture(scope="module")
def results(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-tasks")
    jobs = []
    for i, (name, file, content, flags, _) in enumerate(CASES):
        case = tmp / f"case{i:02d}"
        case.mkdir()
        path = case / file
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        if flags == ["sft"]:  # a chat data file, through an sft recipe that names it
            recipe = case / "sft.yaml"
            recipe.write_text(f"stage: sft\nrun:\n  out: {case / 'out'}\nbase: {checkpoint}\ndata:\n  sources:\n"
                              f"    - {{kind: jsonl, path: {path}}}\n"
                              "train:\n  steps: 1\n  batch_size: 1\n  seq_len: 32\n")
            command = ["sft", str(recipe)]
        elif flags == ["--prompts"]:
            command = ["generate", str(checkpoint), *flags, str(path)]
        else:
            command = ["eval", str(checkpoint), *flags, str(path), "--out", str(case / "out")]
        jobs.append({"name": name, "argv": command, "cwd": str(case)})
    (tmp / "cases.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-m", "tests.hostile.worker", str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp.rglob("CANARY")), "a task file ran code"
    return {r["name"]: r for r in json.loads((tmp / "results.json").read_text())}


@pytest.mark.parametrize("name, file, code", [(c[0], c[1], c[4]) for c in CASES])
def test_task_file(results, name, file, code):
    r = results[name]
    assert r["traceback"] is None, r["traceback"]
    assert r["code"] == code, r["stderr"]
    assert r["stderr"] and all(line.startswith("error: ") for line in r["stderr"]), r["stderr"]
    assert file in r["stderr"][0], r["stderr"]
