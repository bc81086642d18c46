"""Generation tasks: greedy completions through `mmctl.generate`, answer extraction, exact match.

Prompts are batched (left-padded by the decoder); completions stop at a stop string (a newline by default) or
`max_new_tokens`. Reports exact match with its standard error, and the decoder's time to first token and decode
tokens/s.
"""

from __future__ import annotations

from mmctl.evals.extract import exact_match, extract
from mmctl.evals.multiple_choice import mean, stderr
from mmctl.evals.tasks import TaskConfig, fewshot_items, fewshot_prefix
from mmctl.tokenizer.bpe import END


def evaluate(model, tok, task: TaskConfig, items: list[dict], *, batch_size: int, seed: int,
             stats: dict, chat: bool = False) -> tuple[dict, list[dict]]:
    from mmctl.generate import SamplingConfig, completion_text, generate

    if chat:  # a chat model answers a user turn and ends its turn with <|end|>, not a newline
        stop, prompt_ids = task.stop, _chat_prompts(tok, task, seed)
    else:
        prefix = fewshot_prefix(task, seed, lambda it: f"{it['prompt']} {it['answer']}")
        stop, prompt_ids = task.stop or ["\n"], lambda item: tok.encode(prefix + item["prompt"])
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens, stop_strings=stop)
    stops = [tok.eos_id] + ([tok.token_id(END)] if chat and tok.token_id(END) is not None else [])
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


def _chat_prompts(tok, task: TaskConfig, seed: int):
    """item → the ids of a chat conversation asking it (few-shot examples as earlier user/assistant turns)."""
    from mmctl.data.chat import render, template_of

    shots = [m for item in fewshot_items(task, seed) for m in
             ({"role": "user", "content": item.get("question", item["prompt"])},
              {"role": "assistant", "content": str(item["answer"])})]

    def ids(item: dict) -> list[int]:
        messages = shots + [{"role": "user", "content": item.get("question", item["prompt"])}]
        return tok.encode_special(render(messages, tok.chat_template, add_generation_prompt=True,
                                         where=template_of(tok)))

    return ids
