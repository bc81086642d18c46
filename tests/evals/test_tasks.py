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


def test_a_text_file_splits_into_documents_and_gsm8k_items_read_as_generation(tmp_path):
    from mmctl.evals.tasks import TaskConfig, items_of

    text = tmp_path / "wiki.txt"
    text.write_text("First article.\n\nSecond one.\n\n\n\nThird.")
    assert len(items_of(TaskConfig(kind="perplexity", data=str(text)))) == 1  # lm-eval's wikitext convention
    split = items_of(TaskConfig(kind="perplexity", data=str(text), separator="\n\n"))
    assert [d["text"].strip() for d in split] == ["First article.", "Second one.", "Third."]
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "Tom has 3 apples and buys 4. How many?",
                               "answer": "3 + 4 = 7\n#### 7"}) + "\n")
    (item,) = items_of(TaskConfig(kind="generation", data=str(gsm)))
    assert item["prompt"].startswith("Tom has") and item["answer"] == "7"


def test_dpo_reads_trls_implicit_prompt_pairs():
    from mmctl.data.rl import pair

    shared = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]
    got = pair({"chosen": [*shared, {"role": "assistant", "content": "4"}],
                "rejected": [*shared, {"role": "assistant", "content": "5"}]}, "p.jsonl:1")
    assert (got.prompt, got.chosen, got.rejected) == (shared, "4", "5")
