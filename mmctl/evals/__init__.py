"""Evaluation: `score(model, tok, task, …)` runs one task on one model — its items handed to the scorer of its kind
(perplexity.py, multiple_choice.py, generation.py, vqa.py) — and returns (metrics, samples). `mmctl eval` calls it
per checkpoint and task, `mmctl quantize` per quantized model. What a task is: tasks.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmctl.recipe import option


@dataclass
class ScoringConfig:
    batch_size: int = option(8, "sequences per forward pass (scores do not depend on it)", ge=1)
    limit: int | None = option(None, "score at most this many items per task", ge=1)
    chat: bool | None = option(None, "ask generation and multiple-choice tasks through the chat template; unset: "
                                     "for chat models (those `mmctl sft` writes)")
    samples: int = option(0, "generation tasks: answers sampled per item beside the greedy one, scored as pass@k "
                             "and maj@k for k = 1, 2, 4, …, samples (test-time compute); 0: greedy only",
                          ge=0, le=1024)
    temperature: float = option(1.0, "the sampling temperature of those answers", gt=0)


def score(model, tok, task, options: ScoringConfig, seed: int, stats: dict, chat: bool = False
          ) -> tuple[dict, list[dict]]:
    """(metrics, samples) of `task` on `model`, batched and limited as `options` (a ScoringConfig) says."""
    from mmctl.evals import generation, multiple_choice, perplexity
    from mmctl.evals.tasks import items_of

    kind = task.task_kind
    if kind == "vqa":
        return _vqa(model, tok, task, options)
    if kind == "perplexity" and task.data and Path(task.data).is_dir():
        items = [{"text": doc} for doc in perplexity.shard_documents(task.data, task.split, tok)]
    else:
        items = items_of(task)
    items = items[: options.limit] if options.limit else items
    module = {"perplexity": perplexity, "multiple_choice": multiple_choice, "generation": generation}[kind]
    if kind == "perplexity":
        items = [item["text"] for item in items]
    extra = {"chat": chat} if kind != "perplexity" else {}
    if kind == "generation":
        extra |= {"samples": options.samples if task.samples is None else task.samples,
                  "temperature": options.temperature}
    return module.evaluate(model, tok, task, items, batch_size=options.batch_size, seed=seed, stats=stats,
                           **extra)


def _vqa(model, tok, task, options: ScoringConfig) -> tuple[dict, list[dict]]:
    """Questions about images: the built-in shapes set at the model's image size (fresh scenes, and scenes with
    colour–kind pairs training never shows), or a jsonl of {image, question, answer, type}."""
    from mmctl.data import vqa
    from mmctl.evals import vqa as vqa_eval

    size = model.vision.encoder.image_size
    if task.builtin:
        examples, composition = vqa.builtin(task.items, max(task.items // 5, 1), size)
    else:
        examples, composition = vqa.read_jsonl(task.data, size, options.limit), []
    if options.limit:
        examples, composition = examples[:options.limit], composition[:options.limit]
    scores, samples = vqa_eval.evaluate(model, tok, examples, composition, options.batch_size)
    return vqa_eval.metrics(scores), samples
