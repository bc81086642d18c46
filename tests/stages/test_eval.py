"""`mmctl eval` asks a chat model through its chat template — generation and multiple choice alike — and a
base model in the plain format; the log-likelihoods behind a chat model's choice are checked by hand."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from mmctl import recipe  # noqa: E402
from mmctl.stages import eval as stage  # noqa: E402


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint, tmp_path_factory):
    from mmctl.models import transformer

    model, tok = transformer.load_with_tokenizer(checkpoint)
    return transformer.save_checkpoint(model, tmp_path_factory.mktemp("chat") / "model", tok, chat=True)


def run(checkpoints, out, **section):
    data = {"run": {"out": str(out), "device": "cpu"}, "checkpoints": [str(c) for c in checkpoints],
            "tasks": [{"builtin": "arithmetic-mc", "items": 3}, {"builtin": "arithmetic", "items": 2,
                                                                 "max_new_tokens": 3}],
            "eval": {"batch_size": 2, **section}}
    return stage.run(recipe.build(stage.EvalConfig, data, recipe.Source("r", {}, set())))


def by_hand(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one forward pass over the two, unpadded."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    return sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_a_chat_model_is_asked_through_its_template(checkpoint, chat_checkpoint, tmp_path):
    from mmctl.data.chat import render
    from mmctl.evals.tasks import builtin_items
    from mmctl.models import transformer

    result = run([checkpoint, chat_checkpoint], tmp_path / "e")
    tasks = {c: result.results["checkpoints"][str(c)]["tasks"] for c in (checkpoint, chat_checkpoint)}
    assert {t["format"] for t in tasks[checkpoint].values()} == {"plain"}
    assert {t["format"] for t in tasks[chat_checkpoint].values()} == {"chat"}
    model, tok = transformer.load_with_tokenizer(chat_checkpoint)
    samples = [json.loads(line) for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    asked = [s for s in samples if s["checkpoint"] == str(chat_checkpoint) and s["task"] == "arithmetic-mc"]
    for item, sample in zip(builtin_items("arithmetic-mc", 3), asked, strict=True):
        context = tok.encode_special(render([{"role": "user", "content": item["question"]}], tok.chat_template,
                                            add_generation_prompt=True))
        expected = [by_hand(model, context, tok.encode(choice)) for choice in item["choices"]]
        assert sample["logprobs"] == pytest.approx(expected, abs=1e-4)
    forced = run([chat_checkpoint], tmp_path / "p", chat=False).results["checkpoints"][str(chat_checkpoint)]
    assert {t["format"] for t in forced["tasks"].values()} == {"plain"}
