"""Preference pairs for DPO: a prompt with a chosen and a rejected completion → two token rows whose trained mask
covers the completion only (its tokens and the end-of-turn token; never the prompt).

One JSON object per line, in TRL's two preference formats:
- standard: `{"prompt": str, "chosen": str, "rejected": str}` — the prompt is one user turn;
- conversational: `{"prompt" | "messages": [{role, content}, …], "chosen": …, "rejected": …}`, each completion
  a string or a list holding one assistant message.

Built-in on-policy pairs come from the starting model itself (`rl/pairs.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmctl.data.chat import END, ROLES, START
from mmctl.data.sft import Example
from mmctl.errors import DataError


@dataclass
class Pair:
    prompt: list[dict]  # chat messages, the last one not the assistant's
    chosen: str
    rejected: str


def pair(record: dict, where: str) -> Pair:
    """One JSONL record in either format → a Pair (one-line DataError naming `where` otherwise)."""
    key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if key is None or "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: not a preference pair (expected prompt or messages, chosen and rejected; has: "
                        f"{', '.join(sorted(record)) or 'nothing'})")
    prompt = record[key]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: {key} is neither text nor a non-empty list of messages")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] is not {{role: system|user|assistant, content: text}}")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: {key} ends with an assistant message; the completions are the assistant's reply")
    chosen, rejected = (_completion(record[k], k, where) for k in ("chosen", "rejected"))
    texts = [m["content"] for m in prompt] + [chosen, rejected]
    if any(START in t or END in t for t in texts):
        raise DataError(f"{where}: contains the code point U+E000 or U+E001, reserved for rendering chat templates")
    return Pair(prompt, chosen, rejected)


def _completion(value, key: str, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0] if value[0].get("role") == "assistant" else None
        value = value.get("content") if value else None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} is neither text nor a list holding one assistant message")
    return value


def read_pairs(path, split: str | None = None) -> list[Pair]:
    """Every pair of a JSONL file, or with a split of a datasets directory."""
    from mmctl.data import jsonl
    from mmctl.data.sources import dataset_records

    records = jsonl.records(path) if split is None else dataset_records(str(path), split)
    out = [pair(record, where) for where, record in records]
    if not out:
        raise DataError(f"{path}: no preference pairs")
    return out


def encode(p: Pair, tok) -> tuple[Example, Example]:
    """(chosen, rejected) as ids with a mask on the completion: the prompt rendered with the generation prompt
    must be where both conversations start (true of every template that renders turn by turn)."""
    from mmctl.data.chat import template_of, tokenize

    prompt_ids, _ = tokenize(p.prompt, tok, add_generation_prompt=True)
    out = []
    for completion in (p.chosen, p.rejected):
        ids, _ = tokenize(p.prompt + [{"role": "assistant", "content": completion}], tok)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise DataError(f"{template_of(tok)}: renders a prompt differently alone than before a reply, so the "
                            "completion's tokens cannot be told apart")
        out.append(Example(ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))))
    return out[0], out[1]
