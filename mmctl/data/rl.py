"""The rl stage's data, one JSON object per line (or a `datasets` directory with the same columns).

Preference pairs for DPO: a prompt with a chosen and a rejected completion → two token rows whose trained mask
covers the completion only (its tokens and the end-of-turn token; never the prompt). In TRL's three formats:
- standard: `{"prompt": str, "chosen": str, "rejected": str}` — the prompt is one user turn;
- conversational: `{"prompt" | "messages": [{role, content}, …], "chosen": …, "rejected": …}`, each completion
  a string or a list holding one assistant message;
- implicit prompt: `{"chosen": [messages…], "rejected": [messages…]}`, two whole conversations whose shared first
  messages are the prompt.

Built-in on-policy pairs come from the starting model itself (`rl/pairs.py`).

Problems with verifiable answers for GRPO: `{"prompt" | "messages" | "question": …, "answer": str | number}` (the
prompt as above; `question` as GSM8K names it, whose answers end with `#### N`: the reference is then N);
built-in arithmetic problems come from `data/synthetic.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Literal

from mmctl.data.chat import END, ROLES, START
from mmctl.data.mixture import Source
from mmctl.data.sft import Example
from mmctl.errors import DataError
from mmctl.recipe import option


@dataclass
class PairSource(Source):
    kind: Literal["jsonl", "datasets", "arithmetic"] = option(
        None, "jsonl | datasets (a save_to_disk dir): prompt or messages, chosen, rejected | arithmetic: on-policy "
              "pairs — the starting model's own answers to problems, a right one preferred to a wrong one",
        required=True)
    path: str | None = option(None, "jsonl: the file; datasets: the directory")
    pairs: int | None = option(None, "files: read at most this many pairs", ge=1, le=10**8)
    problems: int | None = option(None, "arithmetic: problems asked (a pair comes from each the model sometimes "
                                        "gets wrong)", ge=1, le=10**6)
    samples: int = option(4, "arithmetic: answers sampled per problem", ge=2, le=64)
    temperature: float = option(1.0, "arithmetic: sampling temperature of those answers", gt=0, le=100)
    answer_tokens: int = option(32, "arithmetic: tokens an answer may take (a cut-off answer counts as wrong)", ge=1,
                                le=4096)

    COUNT: ClassVar[str] = "pairs"

    @property
    def limit(self) -> int | None:
        return self.problems if self.kind == "arithmetic" else self.pairs

    def check(self) -> list[tuple[str, str]]:
        if self.kind == "arithmetic":
            if self.path or self.pairs:
                return [("path" if self.path else "pairs", "an arithmetic source is made, not read: set problems")]
            return [] if self.problems else [("problems", "missing required value: how many problems to ask")]
        if self.problems:
            return [("problems", f"a {self.kind} source is read: cap it with pairs")]
        return super().check()


@dataclass
class ProblemSource(Source):
    kind: Literal["jsonl", "datasets", "arithmetic"] = option(
        None, "jsonl | datasets (a save_to_disk dir): prompt, messages or question, and answer | arithmetic "
              "(built in)", required=True)
    path: str | None = option(None, "jsonl: the file; datasets: the directory")
    problems: int | None = option(None, "arithmetic: how many to make; files: read at most this many", ge=1,
                                  le=10**6)

    COUNT: ClassVar[str] = "problems"


@dataclass
class Pair:
    prompt: list[dict]  # chat messages, the last one not the assistant's
    chosen: str
    rejected: str


@dataclass
class Problem:
    prompt: list[dict]  # chat messages, the last one not the assistant's
    answer: str  # what a correct completion's answer equals (mmctl/rl/rewards.py)


def pair(record: dict, where: str) -> Pair:
    """One JSONL record in any of TRL's formats → a Pair (one-line DataError naming `where` otherwise)."""
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: not a preference pair (expected prompt or messages, chosen and rejected; has: "
                        f"{', '.join(sorted(record)) or 'nothing'})")
    if "prompt" not in record and "messages" not in record:
        record = _implicit_prompt(record, where)
    prompt = _prompt(record, where)
    chosen, rejected = (_completion(record[k], k, where) for k in ("chosen", "rejected"))
    _check_text([chosen, rejected], where)
    return Pair(prompt, chosen, rejected)


def _implicit_prompt(record: dict, where: str) -> dict:
    """TRL's implicit-prompt format: `chosen` and `rejected` are whole conversations sharing their first messages;
    the shared part is the prompt, the rest of each its completion."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: no prompt (expected prompt or messages, or chosen and rejected conversations "
                        "sharing their first messages)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if not shared:
        raise DataError(f"{where}: chosen and rejected share no first message to be the prompt")
    return {**record, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def problem(record: dict, where: str) -> Problem:
    """One JSONL record → a Problem (one-line DataError naming `where` otherwise)."""
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise DataError(f"{where}: not a problem with an answer (expected prompt, messages or question, and answer "
                        f"as text or a number; has: {', '.join(sorted(record)) or 'nothing'})")
    answer = str(answer).rpartition("####")[2].strip()  # GSM8K: the worked solution, then "#### 72"
    if not answer:
        raise DataError(f"{where}: the answer is empty after its ####")
    if "prompt" not in record and "messages" not in record and isinstance(record.get("question"), str):
        record = {**record, "prompt": record["question"]}
    return Problem(_prompt(record, where), answer)


def _prompt(record: dict, where: str) -> list[dict]:
    key = "prompt" if "prompt" in record else "messages" if "messages" in record else None
    if key is None:
        raise DataError(f"{where}: no prompt (expected prompt or messages; has: "
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
    _check_text([m["content"] for m in prompt], where)
    return prompt


def _check_text(texts: list[str], where: str) -> None:
    if any(START in t or END in t for t in texts):
        raise DataError(f"{where}: contains the code point U+E000 or U+E001, reserved for rendering chat templates")


def _completion(value, key: str, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0] if value[0].get("role") == "assistant" else None
        value = value.get("content") if value else None
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} is neither text nor a list holding one assistant message")
    return value


def key(item: Pair | Problem) -> str:
    """The text a mixture splits a pair or problem by (its prompt and answers)."""
    return json.dumps(vars(item), ensure_ascii=False)


def read_pairs(path, split: str | None = None) -> list[Pair]:
    """Every pair of a JSONL file, or with a split of a datasets directory."""
    return _read(path, split, pair, "preference pairs")


def read_problems(path, split: str | None = None) -> list[Problem]:
    """Every problem of a JSONL file, or with a split of a datasets directory."""
    return _read(path, split, problem, "problems")


def problems(source: ProblemSource, seed: int, system_prompt: str | None = None) -> list[Problem]:
    """A problem source's problems (built-in arithmetic from the training part of the problem space), each
    after `system_prompt` when it has no system message of its own."""
    from mmctl.data.synthetic import arithmetic_problems

    if source.kind == "arithmetic":
        found = [Problem([{"role": "user", "content": p.question}], str(p.answer))
                 for p in arithmetic_problems(source.problems, seed, split="train")]
    else:
        found = read_problems(source.path, source.split if source.kind == "datasets" else None)
    if system_prompt:
        system = {"role": "system", "content": system_prompt}
        found = [p if p.prompt[0]["role"] == "system" else Problem([system, *p.prompt], p.answer) for p in found]
    return found


def _read(path, split: str | None, parse, what: str) -> list:
    from mmctl.data import jsonl
    from mmctl.data.sources import dataset_records

    records = jsonl.records(path) if split is None else dataset_records(str(path), split)
    out = [parse(record, where) for where, record in records]
    if not out:
        raise DataError(f"{path}: no {what}")
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
