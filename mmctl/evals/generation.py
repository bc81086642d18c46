"""Generation tasks: greedy completions through `mmctl.generate`, answer extraction, exact match.

Prompts are batched (left-padded by the decoder); completions stop at a stop string (a newline by default) or
`max_new_tokens`. Reports exact match with its standard error, and the decoder's time to first token and decode
tokens/s.
"""

from __future__ import annotations

from mmctl.data.chat import stop_ids
from mmctl.evals.extract import exact_match, extract
from mmctl.evals.multiple_choice import mean, stderr
from mmctl.evals.tasks import TaskConfig, chat_prompts, fewshot_prefix


def evaluate(model, tok, task: TaskConfig, items: list[dict], *, batch_size: int, seed: int,
             stats: dict, chat: bool = False) -> tuple[dict, list[dict]]:
    from mmctl.generate import SamplingConfig, completion_text, generate

    if chat:  # a chat model answers a user turn and ends its turn with <|end|>, not a newline
        stop, prompt_ids = task.stop, chat_prompts(tok, task, seed, lambda it: it.get("question", it["prompt"]),
                                                   lambda it: str(it["answer"]))
    else:
        prefix = fewshot_prefix(task, seed, lambda it: f"{it['prompt']} {it['answer']}")
        stop, prompt_ids = task.stop or ["\n"], lambda item: tok.encode(prefix + item["prompt"])
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, stop_strings=stop)
    stops = stop_ids(tok) if chat else [tok.eos_id]
    samples, correct, ttft, decode_rates = [], [], [], []
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        prompts = [prompt_ids(item) for item in batch]
        out = generate(model, prompts, sampling, stop_token_ids=stops, decode=tok.decode)
        ttft.append(out.time_to_first_token)
        if out.decode_tokens_per_s:
            decode_rates.append(out.decode_tokens_per_s)
        for item, completion in zip(batch, out.completions, strict=True):
            text = completion_text(tok, completion, stop)
            predicted = extract(text, task.extraction)
            correct.append(float(exact_match(predicted, item["answer"])))
            samples.append({"prompt": item["prompt"], "target": item["answer"], "completion": text,
                            "prediction": predicted, "exact_match": correct[-1]})
    stats["time_to_first_token_s"] = mean(ttft)
    if decode_rates:
        stats["decode_tokens_per_s"] = mean(decode_rates)
    return {"exact_match": mean(correct), "exact_match_stderr": stderr(correct), "n": len(items),
            "format": "chat" if chat else "plain"}, samples
