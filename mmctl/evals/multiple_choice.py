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
from mmctl.evals.tasks import TaskConfig, chat_prompts, fewshot_prefix

DELIMITER = " "


def evaluate(model, tok, task: TaskConfig, items: list[dict], *, batch_size: int, seed: int,
             stats: dict, chat: bool = False) -> tuple[dict, list[dict]]:
    if chat:  # the question as a user turn, each choice as the start of the assistant's reply
        context_ids, delimiter = chat_prompts(tok, task, seed, lambda it: it.get("question", it["context"]),
                                              lambda it: it["choices"][it["answer"]]), ""
    else:  # the few-shot examples and the context as plain text, each choice after a space
        prefix = fewshot_prefix(task, seed, lambda it: it["context"] + DELIMITER + it["choices"][it["answer"]])
        context_ids, delimiter = (lambda item: tok.encode(prefix + item["context"])), DELIMITER
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


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def stderr(xs: list[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's `mean_stderr`)."""
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
