"""Multiple choice by log-likelihood (lm-eval's `output_type: multiple_choice`).

Each choice is scored as the continuation `" " + choice` after the (few-shot prefixed) context. `acc` takes the
highest total log-probability; `acc_norm` divides each total by the choice's length in characters (without
the delimiter) first — lm-eval's normalization, which removes the bias toward short answers.
"""

from __future__ import annotations

import math

from mmctl.evals.scoring import loglikelihoods
from mmctl.evals.tasks import TaskConfig, fewshot_prefix

DELIMITER = " "


def evaluate(model, tok, task: TaskConfig, items: list[dict], *, batch_size: int, seed: int,
             stats: dict) -> tuple[dict, list[dict]]:
    prefix = fewshot_prefix(task, seed, lambda it: it["context"] + DELIMITER + it["choices"][it["answer"]])
    requests, owners = [], []
    for i, item in enumerate(items):
        context = tok.encode(prefix + item["context"])
        for choice in item["choices"]:
            requests.append((context, tok.encode(DELIMITER + choice)))
            owners.append(i)
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
            "acc_norm_stderr": stderr(acc_norm), "chance": chance, "n": len(items)}, samples


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def stderr(xs: list[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's `mean_stderr`)."""
    if len(xs) < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
