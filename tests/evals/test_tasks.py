"""Task files: malformed ones are one-line errors naming the line (exit 3, as every JSONL reader); built-ins
are well formed."""

import json

import pytest

from mmctl.errors import DataError
from mmctl.evals.tasks import MC_FIELDS, TaskConfig, builtin_items, read_jsonl


@pytest.mark.parametrize("lines, fragment", [
    (['{"context": "a", "choices": ["x", "y"], "answer": 0}', "{oops"], "t.jsonl:2: not a JSON object"),
    (['{"context": "a", "choices": ["x", "y"]}'], "t.jsonl:1: missing field 'answer'"),
    (['[1, 2]'], "t.jsonl:1: expected a JSON object, got list"),
    (['{"context": "a", "choices": ["x", "y"], "answer": 2}'], "t.jsonl:1: answer 2 is not an index"),
    (['{"context": "a", "choices": ["x"], "answer": 0}'], "t.jsonl:1: choices must be a list of at least two"),
    (['', '{"context": 5, "choices": ["x", "y"], "answer": 0}'], "t.jsonl:2: field 'context' is int, expected str"),
    (['{"context": "a", "choices": ["x", "y"], "answer": true}'], "t.jsonl:1: field 'answer' is bool, expected int"),
])
def test_malformed_task_files(tmp_path, lines, fragment):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_jsonl(path, MC_FIELDS)
    assert fragment in str(e.value) and e.value.exit_code == 3 and "\n" not in str(e.value)


def test_builtins_are_well_formed():
    for item in builtin_items("stories-mc", 50) + builtin_items("arithmetic-mc", 50):
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert 0 <= item["answer"] < 4
    for item in builtin_items("stories-mc", 20):
        friend = item["choices"][item["answer"]].rstrip("!")
        assert f"{friend}, a " in item["context"]  # the answer is the friend the story introduced
    gen = builtin_items("arithmetic", 20)
    assert all(item["prompt"].startswith("Question: What is ") and isinstance(item["answer"], int) for item in gen)


def test_task_rules():
    assert TaskConfig().check()[0][0] == "kind"
    assert TaskConfig(kind="generation").check()[0][0] == "data"
    assert TaskConfig(builtin="arithmetic", data="x").check()[0][0] == "data"
    assert TaskConfig(kind="generation", data="x", extract="first").check()[0][0] == "extract"
    assert TaskConfig(builtin="stories-ppl").task_kind == "perplexity"
    json.dumps(TaskConfig(builtin="arithmetic").__dict__)
