"""Multiple choice by log-likelihood (lm-eval's `output_type: multiple_choice`).

Each choice is scored as the continuation `" " + choice` after the (few-shot prefixed) context; for a chat model
as the start of the assistant's turn after the question asked as a user turn (few-shot examples as earlier
turns). `acc` takes the
highest total log-probability; `acc_norm` divides each total by the choice's length in characters (without
the delimiter) first — lm-eval's normalization, which removes the bias toward short answers.
"""

from __future__ import annotations

import math

from mmctl.evals.scoring import loglikelihoods
from mmctl.evals.tasks import TaskConfig, fewshot_prefix

DELIMITER = " "


def evaluate(model, tok, task: TaskConfig, items: list[dict], *, batch_size: int, seed: int,
             stats: dict, chat: bool = False) -> tuple[dict, list[dict]]:
    context_ids, delimiter = _chat_contexts(tok, task, seed) if chat else _plain_contexts(tok, task, seed)
    requests = []
    for item in items:
        context = context_ids(item)
        for choice in item["choices"]:
            requests.append((context, tok.encode(delimiter + choice)))
    scores = loglikelihoods(model, requests, batch_size=batch_size, stats=stats)
    samples, acc, acc_norm = [], [], []
    k = 0
    for item in items:
        n = len(item["choices"])
        lps = [s.logprob for s in scores[k:k + n]]
        k += n
        normed = [lp / max(len(c), 1) for lp, c in zip(lps, item["choices"], strict=True)]
        pick, pick_norm = max(range(n), key=lps.__getitem__), max(range(n), key=normed.__getitem__)
        acc.append(float(pick == item["answer"]))
        acc_norm.append(float(pick_norm == item["answer"]))
        samples.append({"context": item["context"], "choices": item["choices"], "target": item["answer"],
                        "prediction": pick, "prediction_norm": pick_norm, "logprobs": lps,
                        "acc": acc[-1], "acc_norm": acc_norm[-1]})
    chance = sum(1 / len(item["choices"]) for item in items) / len(items)
    return {"acc": mean(acc), "acc_stderr": stderr(acc), "acc_norm": mean(acc_norm),
            "acc_norm_stderr": stderr(acc_norm), "chance": chance, "n": len(items),
            "format": "chat" if chat else "plain"}, samples


def _plain_contexts(tok, task: TaskConfig, seed: int):
    """(item → context ids, delimiter): few-shot examples and the context as plain text, each choice after a
    space."""
    prefix = fewshot_prefix(task, seed, lambda it: it["context"] + DELIMITER + it["choices"][it["answer"]])
    return (lambda item: tok.encode(prefix + item["context"])), DELIMITER


def _chat_contexts(tok, task: TaskConfig, seed: int):
    """(item → context ids, delimiter) for a chat model: the item's `question` (else its context) as a user turn,
    few-shot examples as earlier turns, and each choice as the start of the assistant's answer."""
    from mmctl.data.chat import render, template_of
    from mmctl.evals.tasks import fewshot_items

    def turn(item: dict) -> dict:
        return {"role": "user", "content": item.get("question", item["context"])}

    shots = [m for it in fewshot_items(task, seed)
             for m in (turn(it), {"role": "assistant", "content": it["choices"][it["answer"]]})]
    return (lambda item: tok.encode_special(render(shots + [turn(item)], tok.chat_template,
                                                   add_generation_prompt=True, where=template_of(tok)))), ""


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def stderr(xs: list[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's `mean_stderr`)."""
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
