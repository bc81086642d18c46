"""Evaluation tasks: what a task is, how its items are read, and the built-in offline tasks.

A task is a `TaskConfig` — inline in an eval recipe, in a YAML file of its own, or made from command-line flags
— of one of four kinds, the first three scored as lm-evaluation-harness scores them:
- perplexity: documents from a text file, a jsonl field, or a shard split; rolling windows (`eval.stride`);
- multiple_choice: jsonl items `{"context": str, "choices": [str, …], "answer": int}`; log-likelihood of each
  choice after the context (acc, and acc_norm by characters);
- generation: jsonl items `{"prompt": str, "answer": str | number}`; greedy completion, answer extraction,
  exact match after numeric normalization;
- vqa (vision-language models): jsonl items `{"image": path, "question": str, "answer": str | number, "type": str
  (optional)}`, images relative to the file; greedy answers, accuracy per type (mmctl/evals/vqa.py).

Built-in tasks, generated offline from the project's procedural data so the tiny pipeline can show what each
stage changes: `arithmetic` (generation, the held-out tenth of problems), `arithmetic-mc` (4 choices),
`stories-mc` (which friend is thanked at the end of a tiny story, 4 choices), `stories-ppl` (fresh stories),
`story-questions` (generation: who helped, what was found, where, which animal — one-word answers), `shapes-vqa`
(vqa: fresh shapes scenes, six question types, and scenes with colour–kind pairs training never shows).

Generation tasks ask a chat model (one `mmctl sft` wrote) through its chat template: the item's `question` (or
its `prompt`) as a user turn, few-shot examples as earlier turns; `--no-chat` asks it in the plain format.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl.data.synthetic import BUILTIN_SEED  # the built-in sets' seed (re-exported)
from mmctl.errors import DataError, UsageError
from mmctl.recipe import option

BUILTINS = ("arithmetic", "arithmetic-mc", "stories-mc", "stories-ppl", "story-questions", "shapes-vqa")


@dataclass
class TaskConfig:
    name: str | None = option(None, "label in the results; default: the built-in's name or the data file's stem")
    builtin: Literal["arithmetic", "arithmetic-mc", "stories-mc", "stories-ppl", "story-questions",
                     "shapes-vqa"] | None = option(None, "a built-in offline task (then kind and data are implied)")
    kind: Literal["perplexity", "multiple_choice", "generation", "vqa"] | None = option(
        None, "perplexity | multiple_choice | generation | vqa (a vision-language model)")
    data: str | None = option(None, "items: jsonl file; for perplexity also a text file or a shards directory")
    field: str = option("text", "perplexity over jsonl: the field holding each document")
    separator: str | None = option(None, "perplexity over a text file: split it into documents at this string (e.g. "
                                         "a blank line, as tokenize's text sources); unset: one document")
    split: str = option("val", "perplexity over a shards directory: the split to score")
    fewshot_data: str | None = option(None, "jsonl items to draw few-shot examples from (the task's train split)")
    num_fewshot: int = option(0, "examples prepended to each context", ge=0, le=1000)
    stride: int | None = option(None, "perplexity: tokens between rolling windows; unset: the model's context",
                                ge=1)
    max_new_tokens: int = option(32, "generation: tokens to generate at most", ge=1, le=65536)
    stop: list[str] = option(list, "generation: stop strings (default: a newline)")
    extract: str | None = option(None, "generation: last_number | hashes (#### answer) | exact | regex:PATTERN "
                                         "(the first group, or the whole match); unset: last_number (the first word "
                                         "for story-questions)")
    items: int = option(500, "built-in tasks: how many items to generate", ge=1, le=100_000)
    samples: int | None = option(None, "generation: answers sampled per item beside the greedy one, scored as "
                                       "pass@k and maj@k; unset: eval.samples", ge=0, le=1024)

    def check(self) -> list[tuple[str, str]]:
        if self.samples and self.task_kind not in (None, "generation"):
            return [("samples", f"only a generation task samples answers (this one is {self.task_kind})")]
        if self.builtin:
            return [("data", "a built-in task takes no data")] if self.data else []
        if not self.kind:
            return [("kind", "missing required value: set kind (or builtin)")]
        if not self.data:
            return [("data", f"missing required value: a {self.kind} task needs data")]
        if self.separator is not None and (self.kind != "perplexity" or self.separator == ""):
            return [("separator", "only a perplexity task over a text file is split, at a non-empty string")]
        if self.extract is None:
            return []
        if self.extract not in ("last_number", "hashes", "exact") and not self.extract.startswith("regex:"):
            return [("extract", f"{self.extract!r} is not one of last_number, hashes, exact, regex:PATTERN")]
        if self.extract.startswith("regex:"):
            try:
                re.compile(self.extract[len("regex:"):])
            except re.error as e:
                return [("extract", f"not a valid regular expression ({e})")]
        return []

    @property
    def label(self) -> str:
        return self.name or self.builtin or Path(self.data).stem

    @property
    def task_kind(self) -> str:
        if self.builtin:
            return {"arithmetic": "generation", "story-questions": "generation", "stories-ppl": "perplexity",
                    "shapes-vqa": "vqa"}.get(self.builtin, "multiple_choice")
        return self.kind

    @property
    def extraction(self) -> str:
        """How an answer is read from a completion: as set, else the first word for story-questions (one-word
        answers), else the last number."""
        return self.extract or ("regex:([A-Za-z]+)" if self.builtin == "story-questions" else "last_number")


def read_jsonl(path: str | Path, required: dict[str, type | tuple]) -> list[dict]:
    """Task items, each checked for its fields; a malformed line is one DataError naming file:line (exit 3)."""
    from mmctl.data import jsonl

    items = []
    for where, item in jsonl.records(path):
        for key, kind in required.items():
            jsonl.field(item, key, kind, where)
        if "choices" in required:
            choices = item["choices"]
            if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{where}: choices must be a list of at least two strings")
            if not 0 <= item["answer"] < len(choices):
                raise DataError(f"{where}: answer {item['answer']} is not an index into the {len(choices)} choices")
        items.append(item)
    if not items:
        raise DataError(f"{path}: no task items")
    return items


MC_FIELDS = {"context": str, "choices": list, "answer": int}
GEN_FIELDS = {"prompt": str, "answer": (str, int, float)}


def generation_item(item: dict, where: str) -> dict:
    """A generation item in either of its formats: {prompt, answer}, or GSM8K's {question, answer} whose answer is
    the worked solution ending in `#### N` (the reference is N, as GRPO's problems read it)."""
    from mmctl.data import jsonl

    if "prompt" not in item and "question" in item:
        answer = str(jsonl.field(item, "answer", (str, int, float), where)).rpartition("####")[2].strip()
        if not answer:
            raise DataError(f"{where}: the answer is empty after its ####")
        return {**item, "prompt": jsonl.field(item, "question", str, where), "answer": answer}
    for key, kind in GEN_FIELDS.items():
        jsonl.field(item, key, kind, where)
    if "group" in item:  # optional: exact match is reported per group too
        jsonl.field(item, "group", str, where)
    return item


def items_of(task: TaskConfig) -> list[dict]:
    """The task's items: multiple choice and generation dicts, or perplexity documents as {"text": …}."""
    if task.builtin:
        return builtin_items(task.builtin, task.items)
    if task.task_kind == "multiple_choice":
        return read_jsonl(task.data, MC_FIELDS)
    if task.task_kind == "generation":
        from mmctl.data import jsonl

        items = [generation_item(item, where) for where, item in jsonl.records(task.data)]
        if not items:
            raise DataError(f"{task.data}: no task items")
        return items
    path = Path(task.data)
    if path.suffix == ".jsonl":
        return [{"text": item[task.field]} for item in read_jsonl(path, {task.field: str})]
    if path.is_file():
        from mmctl.artifacts import regular_file

        try:
            text = regular_file(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        documents = [d for d in text.split(task.separator) if d.strip()] if task.separator else [text]
        if not documents:
            raise DataError(f"{path}: no documents")
        return [{"text": d} for d in documents]
    raise DataError(f"{path}: not a text or jsonl file")  # shard splits are read by mmctl.stages.eval


def fewshot_items(task: TaskConfig, seed: int) -> list[dict]:
    """`num_fewshot` solved examples from the task's train items, the same for every item (seeded)."""
    if not task.num_fewshot:
        return []
    if task.builtin:
        pool = builtin_items(task.builtin, task.num_fewshot, seed=BUILTIN_SEED + 1)
    elif task.fewshot_data:
        pool = read_jsonl(task.fewshot_data, MC_FIELDS if task.task_kind == "multiple_choice" else GEN_FIELDS)
    else:
        raise UsageError(f"tasks: {task.label}: num_fewshot needs fewshot_data (the task's train items)")
    return random.Random(seed).sample(pool, min(task.num_fewshot, len(pool)))


def fewshot_prefix(task: TaskConfig, seed: int, render) -> str:
    """The few-shot examples, each rendered by `render(item)`, separated by blank lines (lm-eval's defaults)."""
    return "".join(render(item) + "\n\n" for item in fewshot_items(task, seed))


def chat_prompts(tok, task: TaskConfig, seed: int, question, answer):
    """item → the ids asking a chat model `question(item)` as a user turn, the few-shot examples as earlier turns
    (their `question` asked, their `answer` given by the assistant): the chat form of `fewshot_prefix`."""
    from mmctl.data.chat import prompt_ids

    shots = [m for it in fewshot_items(task, seed)
             for m in ({"role": "user", "content": question(it)}, {"role": "assistant", "content": answer(it)})]
    return lambda item: prompt_ids(shots + [{"role": "user", "content": question(item)}], tok)


def builtin_items(name: str, n: int, seed: int = BUILTIN_SEED) -> list[dict]:
    from mmctl.data.synthetic import NAMES, arithmetic_problems, stories

    rng = random.Random(f"{name}:{seed}")
    if name == "arithmetic":  # "question" is what a chat model is asked, as a user turn
        return [{"prompt": f"Question: {p.question}\nAnswer:", "question": p.question, "answer": p.answer,
                 "group": p.question.split()[3]} for p in arithmetic_problems(n, seed, split="test")]
    if name == "story-questions":
        from mmctl.data.synthetic import QUESTIONS, story_questions

        return [{"prompt": f"{story}\nQuestion: {q}\nAnswer:", "question": f"{story}\n\nQuestion: {q}", "answer": a,
                 "group": next(key for template, key in QUESTIONS if q.startswith(template.partition("{")[0]))}
                for story, q, a in story_questions(n, seed)]
    if name == "arithmetic-mc":
        items = []
        for p in arithmetic_problems(n, seed, split="test"):
            wrong = set()
            while len(wrong) < 3:
                candidate = p.answer + rng.choice([-10, -2, -1, 1, 2, 10, 11, -11])
                if candidate >= 0 and candidate != p.answer:
                    wrong.add(candidate)
            choices = [str(p.answer)] + [str(w) for w in sorted(wrong)]
            rng.shuffle(choices)
            items.append({"context": f"Question: {p.question}\nAnswer:", "question": p.question, "choices": choices,
                          "answer": choices.index(str(p.answer))})
        return items
    if name == "stories-mc":
        items = []
        for story in stories(n, seed):
            cut = story.index('smiled and said, "Thank you, ') + len('smiled and said, "Thank you,')
            friend = story[cut + 1:].split("!", 1)[0]
            others = rng.sample([x for x in NAMES if x != friend and x not in story[:cut]], 3)
            choices = [f" {name}!" for name in [friend] + others]
            rng.shuffle(choices)
            items.append({"context": story[:cut], "choices": [c[1:] for c in choices],
                          "answer": choices.index(f" {friend}!")})
        return items
    if name == "stories-ppl":
        return [{"text": s} for s in stories(n, seed)]
    raise UsageError(f"unknown built-in task {name!r}; built-ins: {', '.join(BUILTINS)}")
