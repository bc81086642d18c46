"""Generation tasks: greedy completions through `mmctl.generate`, answer extraction, exact match.

Prompts are batched (left-padded by the decoder); completions stop at a stop string (a newline by default) or
`max_new_tokens`. Reports exact match with its standard error — and per `group`, when items name one (the
built-in arithmetic's operation, story-questions' kind of question) — and the decoder's time to first token and
decode tokens/s.

Test-time compute (`eval.samples: N`): beside the greedy answer, N sampled answers per item (`eval.temperature`),
scored two ways for every k = 1, 2, 4, …, N:
- pass@k: the chance that at least one of k answers is right, by Chen et al. (2021)'s unbiased estimator from
  the c right answers among n = N: 1 − C(n − c, k) / C(n, k) (averaging over the N samples, not just k of them);
- maj@k: majority vote (self-consistency, Wang et al. 2023) over the first k answers' extracted predictions,
  ties to the earliest; right if the vote is.
"""

from __future__ import annotations

import math
from dataclasses import replace

from mmctl.data.chat import stop_ids
from mmctl.evals.extract import exact_match, extract, normalize
from mmctl.evals.multiple_choice import mean, stderr
from mmctl.evals.tasks import TaskConfig, chat_prompts, fewshot_prefix


def evaluate(model, tok, task: TaskConfig, items: list[dict], *, batch_size: int, seed: int,
             stats: dict, chat: bool = False, samples: int = 0, temperature: float = 1.0) -> tuple[dict, list[dict]]:
    from mmctl.generate import SamplingConfig, completion_text, generate

    if chat:  # a chat model answers a user turn and ends its turn with <|end|>, not a newline
        stop, prompt_ids = task.stop, chat_prompts(tok, task, seed, lambda it: it.get("question", it["prompt"]),
                                                   lambda it: str(it["answer"]))
    else:
        prefix = fewshot_prefix(task, seed, lambda it: f"{it['prompt']} {it['answer']}")
        stop, prompt_ids = task.stop or ["\n"], lambda item: tok.encode(prefix + item["prompt"])
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, stop_strings=stop)
    stops = stop_ids(tok) if chat else [tok.eos_id]
    samples_out, correct, ttft, decode_rates = [], [], [], []

    def answers(batch: list[dict], sampling: SamplingConfig, repeat: int = 1) -> list[tuple[str, str | None, bool]]:
        """(completion, prediction, right) for each item, `repeat` times in a row."""
        out = generate(model, [prompt_ids(item) for item in batch for _ in range(repeat)], sampling,
                       stop_token_ids=stops, decode=tok.decode)
        ttft.append(out.time_to_first_token)
        if out.decode_tokens_per_s:
            decode_rates.append(out.decode_tokens_per_s)
        scored = []
        for i, completion in enumerate(out.completions):
            text = completion_text(tok, completion, stop)
            predicted = extract(text, task.extraction)
            scored.append((text, predicted, exact_match(predicted, batch[i // repeat]["answer"])))
        return scored

    per_k: dict[str, list[float]] = {}
    groups: dict[str, list[float]] = {}  # exact match per item "group" (arithmetic: the operation)
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        greedy = answers(batch, sampling)
        drawn = []
        if samples:
            drawn = answers(batch, replace(sampling, temperature=temperature, seed=seed * 1_000_003 + b), samples)
        for i, (item, (text, predicted, right)) in enumerate(zip(batch, greedy, strict=True)):
            correct.append(float(right))
            if "group" in item:
                groups.setdefault(str(item["group"]), []).append(float(right))
            record = {"prompt": item["prompt"], "target": item["answer"], "completion": text,
                      "prediction": predicted, "exact_match": correct[-1],
                      **({"group": item["group"]} if "group" in item else {})}
            if samples:
                mine = drawn[i * samples:(i + 1) * samples]
                for name, value in test_time_scores([p for _, p, _ in mine], [r for *_, r in mine]).items():
                    per_k.setdefault(name, []).append(value)
                record["samples"] = [{"completion": t, "prediction": p, "exact_match": float(r)} for t, p, r in mine]
            samples_out.append(record)
    stats["time_to_first_token_s"] = mean(ttft)
    if decode_rates:
        stats["decode_tokens_per_s"] = mean(decode_rates)
    metrics = {"exact_match": mean(correct), "exact_match_stderr": stderr(correct)}
    for name, values in per_k.items():
        metrics |= {name: mean(values), f"{name}_stderr": stderr(values)}
    if groups:
        metrics["groups"] = {g: {"exact_match": mean(v), "exact_match_stderr": stderr(v), "n": len(v)}
                             for g, v in groups.items()}
    return {**metrics, "n": len(items), "format": "chat" if chat else "plain"}, samples_out


def ks(n: int) -> list[int]:
    """1, 2, 4, … up to n, and n itself."""
    out = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return out if out[-1] == n else out + [n]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k from c right answers among n samples, as the stable product
    1 − Π_{i = n − c + 1}^{n} (1 − k / i) (the binomial coefficients overflow for large n)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1 - k / i for i in range(n - c + 1, n + 1))


def majority_right(predictions: list[str | None], right: list[bool]) -> bool:
    """Whether the most frequent normalised prediction (ties: the earliest; no answer never wins) is right."""
    votes: dict[str, int] = {}
    first_right: dict[str, bool] = {}
    for p, r in zip(predictions, right, strict=True):
        if p is None:
            continue
        key = normalize(p)
        votes[key] = votes.get(key, 0) + 1
        first_right.setdefault(key, r)
    if not votes:
        return False
    return first_right[max(votes, key=votes.get)]  # max keeps the first of equal counts: dicts keep order


def test_time_scores(predictions: list[str | None], right: list[bool]) -> dict[str, float]:
    """pass@k and maj@k of one item's samples, for k in ks(len(samples))."""
    n, c = len(right), sum(right)
    out = {f"pass@{k}": pass_at_k(n, c, k) for k in ks(n)}
    out |= {f"maj@{k}": float(majority_right(predictions[:k], right[:k])) for k in ks(n)}
    return out
