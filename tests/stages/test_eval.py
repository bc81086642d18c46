"""`mmctl eval` asks a chat model through its chat template — generation and multiple choice alike — and a
base model in the plain format; the log-likelihoods behind a chat model's choice are checked by hand."""

from __future__ import annotations

import json

import pytest
import torch

from mmctl import recipe  # noqa: E402
from mmctl.errors import UsageError  # noqa: E402
from mmctl.stages import eval as stage  # noqa: E402


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint, tmp_path_factory):
    from mmctl import checkpoints

    model, tok = checkpoints.load(checkpoint)
    return checkpoints.save(model, tmp_path_factory.mktemp("chat") / "model", tok, chat=True)


def run(checkpoints, out, **section):
    data = {"run": {"out": str(out), "device": "cpu"}, "checkpoints": [str(c) for c in checkpoints],
            "tasks": [{"builtin": "arithmetic-mc", "items": 3}, {"builtin": "arithmetic", "items": 2,
                                                                 "max_new_tokens": 3}],
            "eval": {"batch_size": 2, **section}}
    return stage.run(recipe.build(stage.EvalRecipe, data, recipe.Source("r", {}, set())))


def by_hand(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward pass over the two, unpadded."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    return sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_a_chat_model_is_asked_through_its_template(checkpoint, chat_checkpoint, tmp_path):
    from mmctl import checkpoints
    from mmctl.data.chat import prompt_ids
    from mmctl.evals.tasks import builtin_items

    result = run([checkpoint, chat_checkpoint], tmp_path / "e")
    tasks = {c: result.results["checkpoints"][str(c)]["tasks"] for c in (checkpoint, chat_checkpoint)}
    assert {t["format"] for t in tasks[checkpoint].values()} == {"plain"}
    assert {t["format"] for t in tasks[chat_checkpoint].values()} == {"chat"}
    model, tok = checkpoints.load(chat_checkpoint)
    samples = [json.loads(line) for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    asked = [s for s in samples if s["checkpoint"] == str(chat_checkpoint) and s["task"] == "arithmetic-mc"]
    for item, sample in zip(builtin_items("arithmetic-mc", 3), asked, strict=True):
        context = prompt_ids([{"role": "user", "content": item["question"]}], tok)
        expected = [by_hand(model, context, tok.encode(choice)) for choice in item["choices"]]
        assert sample["logprobs"] == pytest.approx(expected, abs=1e-4)
    forced = run([chat_checkpoint], tmp_path / "p", chat=False).results["checkpoints"][str(chat_checkpoint)]
    assert {t["format"] for t in forced["tasks"].values()} == {"plain"}


def test_pass_at_k_is_chen_et_al_unbiased_estimator():
    from math import comb

    from mmctl.evals.generation import ks, pass_at_k

    for n in (1, 5, 16):
        for c in range(n + 1):
            for k in ks(n):
                assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert ks(8) == [1, 2, 4, 8] and ks(6) == [1, 2, 4, 6] and ks(1) == [1]
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - comb(197, 100) / comb(200, 100))  # no overflow


def test_majority_vote_normalises_and_breaks_ties_to_the_earliest():
    from mmctl.evals.generation import majority_right, test_time_scores

    assert majority_right(["7", "8", "8.0"], [True, False, False]) is False  # 8 and 8.0 vote together
    assert majority_right(["7", "8", None, None, None], [True, False, False, False, False]) is True  # tie: earliest
    assert majority_right([None, None], [False, False]) is False
    scores = test_time_scores(["1", "2", "2", "3"], [False, True, True, False])
    assert scores["maj@1"] == 0 and scores["maj@4"] == 1 and scores["pass@1"] == 0.5
    assert scores["pass@4"] == 1 and scores["pass@2"] == pytest.approx(1 - 1 / 6)


def test_samples_per_item_give_pass_and_majority_from_the_recorded_answers(checkpoint, tmp_path):
    """A task a random model sometimes gets right (the first lowercase letter it writes), so the scores are not
    all zero; every metric must follow from the answers samples.jsonl records."""
    from mmctl.evals.generation import test_time_scores

    items = tmp_path / "letters.jsonl"
    items.write_text("".join(json.dumps({"prompt": f"Say {c}:", "answer": c}) + "\n" for c in "etaoinshrdlucmfw"))
    task = {"kind": "generation", "data": str(items), "extract": "regex:([a-z])", "max_new_tokens": 6}
    data = {"run": {"out": str(tmp_path / "s"), "device": "cpu"}, "checkpoints": [str(checkpoint)], "tasks": [task],
            "eval": {"batch_size": 8, "samples": 8, "temperature": 1.5}}
    result = stage.run(recipe.build(stage.EvalRecipe, data, recipe.Source("r", {}, set())))
    metrics = result.results["checkpoints"][str(checkpoint)]["tasks"]["letters"]
    records = [json.loads(line) for line in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 16 and all(len(r["samples"]) == 8 for r in records)
    right = [[bool(s["exact_match"]) for s in r["samples"]] for r in records]
    per_item = [test_time_scores([s["prediction"] for s in r["samples"]], ok)
                for r, ok in zip(records, right, strict=True)]
    for name in ("pass@1", "pass@2", "pass@4", "pass@8", "maj@1", "maj@2", "maj@4", "maj@8"):
        assert metrics[name] == pytest.approx(sum(s[name] for s in per_item) / 16)
    assert metrics["pass@1"] == pytest.approx(sum(map(sum, right)) / 128) and metrics["pass@1"] > 0
    assert metrics["pass@8"] == pytest.approx(sum(map(any, right)) / 16)
    assert metrics["pass@8"] > metrics["pass@1"]


def test_a_tasks_own_samples_override_the_runs(checkpoint, tmp_path):
    """`samples` on a task samples that task alone (the tiny pipeline's pass@k on arithmetic only); 0 turns the
    run's `eval.samples` off for it; a task that generates nothing cannot sample."""
    tasks = [{"builtin": "arithmetic", "items": 4, "max_new_tokens": 3, "samples": 2},
             {"builtin": "arithmetic", "name": "unset", "items": 4, "max_new_tokens": 3},
             {"builtin": "arithmetic", "name": "greedy", "items": 4, "max_new_tokens": 3, "samples": 0}]
    data = {"run": {"out": str(tmp_path / "o"), "device": "cpu"}, "checkpoints": [str(checkpoint)], "tasks": tasks,
            "eval": {"batch_size": 8, "samples": 4}}
    result = stage.run(recipe.build(stage.EvalRecipe, data, recipe.Source("r", {}, set())))
    scored = result.results["checkpoints"][str(checkpoint)]["tasks"]
    assert {m for m in scored["arithmetic"] if m.startswith("pass@")} == {"pass@1", "pass@2", "pass@1_stderr",
                                                                           "pass@2_stderr"}
    assert "pass@4" in scored["unset"] and not any(m.startswith("pass@") for m in scored["greedy"])
    data["tasks"] = [{"builtin": "stories-ppl", "samples": 2}]
    with pytest.raises(UsageError, match="only a generation task samples answers"):
        recipe.build(stage.EvalRecipe, data, recipe.Source("r", {}, set()))


def test_items_with_a_group_are_scored_per_group_too(checkpoint, tmp_path):
    """Exact match per `group` (the built-in arithmetic's operation; any JSONL item's optional field) is the
    mean over that group's recorded answers."""
    items = tmp_path / "letters.jsonl"
    items.write_text("".join(json.dumps({"prompt": f"Say {c}:", "answer": c, "group": "vowel" if c in "aeiou" else
                                         "consonant"}) + "\n" for c in "etaoinshrdlucmfw"))
    task = {"kind": "generation", "data": str(items), "extract": "regex:([a-z])", "max_new_tokens": 6}
    data = {"run": {"out": str(tmp_path / "g"), "device": "cpu"}, "checkpoints": [str(checkpoint)],
            "tasks": [task, {"builtin": "arithmetic", "items": 6, "max_new_tokens": 3}], "eval": {"batch_size": 8}}
    result = stage.run(recipe.build(stage.EvalRecipe, data, recipe.Source("r", {}, set())))
    tasks = result.results["checkpoints"][str(checkpoint)]["tasks"]
    records = [json.loads(line) for line in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    for group in ("vowel", "consonant"):
        mine = [r["exact_match"] for r in records if r.get("group") == group]
        assert tasks["letters"]["groups"][group]["n"] == len(mine) == (5 if group == "vowel" else 11)
        assert tasks["letters"]["groups"][group]["exact_match"] == pytest.approx(sum(mine) / len(mine))
    assert set(tasks["arithmetic"]["groups"]) <= {"+", "-", "*"}
    assert sum(g["n"] for g in tasks["arithmetic"]["groups"].values()) == 6
