"""Supervised fine-tuning data: conversations → token rows that say which tokens are trained.

Built-in offline sets: `arithmetic` and `story-questions` (`builtin`). Formats, one JSON object per line (the
three TRL and torchtune users bring most often):
- chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, …]}`
- prompt–completion: `{"prompt": str, "completion": str}` → one user turn, one assistant turn
- alpaca: `{"instruction": str, "input": str (optional), "output": str}` → the user turn is the instruction,
  a blank line and the input when there is one (Taori et al. 2023's layout without its preamble)

A conversation becomes ids and a mask through the tokenizer's chat template (`data/chat.py`): 1 on the
assistant's tokens and its end-of-turn token, 0 elsewhere (or 1 everywhere with `train_on_prompt`). Rows of
`seq_len + 1` tokens are made by packing — conversations back to back, each with its own `document_ids`, so
attention and positions restart at every conversation (the model computes each as if alone) and no token is
trained to predict the next conversation's first token — or by padding, one conversation per row.

Leaves out: multimodal content parts, tool calls, sharding a conversation longer than a row (it is cut, and
the cut is counted).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import ClassVar, Literal

from mmctl.data.chat import ROLES
from mmctl.data.mixture import Source
from mmctl.errors import DataError
from mmctl.recipe import option


def conversation(record: dict, where: str) -> list[dict]:
    """One JSONL record in any of the three formats → a list of chat messages."""
    from mmctl.data.chat import END, START

    messages = _messages(record, where)
    if any(START in m["content"] or END in m["content"] for m in messages):
        raise DataError(f"{where}: contains the code point U+E000 or U+E001, reserved for rendering chat templates")
    return messages


def _messages(record: dict, where: str) -> list[dict]:
    from mmctl.data import jsonl

    if "messages" in record:
        messages = jsonl.field(record, "messages", list, where)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or \
                    not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] is not {{role: system|user|assistant, content: text}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message (nothing to train on)")
        return messages
    if "prompt" in record or "completion" in record:
        return [{"role": "user", "content": jsonl.field(record, "prompt", str, where)},
                {"role": "assistant", "content": jsonl.field(record, "completion", str, where)}]
    if "instruction" in record or "output" in record:
        extra = jsonl.field(record, "input", str, where) if record.get("input") else ""
        user = jsonl.field(record, "instruction", str, where) + (f"\n\n{extra}" if extra else "")
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": jsonl.field(record, "output", str, where)}]
    raise DataError(f"{where}: not a conversation (expected messages, prompt/completion, or "
                    f"instruction/output; has: {', '.join(sorted(record)) or 'nothing'})")


BUILTINS = ("arithmetic", "story-questions")
MAX_BUILTIN = 1_000_000  # conversations a built-in set may be asked for


@dataclass
class ChatSource(Source):
    kind: Literal["jsonl", "datasets", "arithmetic", "story-questions", "shards"] = option(
        None, "jsonl (chat, prompt/completion or alpaca lines) | datasets (a save_to_disk dir with those columns) | "
              "arithmetic | story-questions (built in) | shards (plain text from a `mmctl tokenize` output dir, "
              "trained on every token: pretraining replay)", required=True)
    path: str | None = option(None, "jsonl: the file; datasets: the directory; shards: the tokenize output dir")
    conversations: int | None = option(None, "built-ins: how many to generate; files: read at most this many; "
                                             "shards: documents drawn at random", ge=1, le=10**8)

    FILES: ClassVar[tuple[str, ...]] = ("jsonl", "datasets", "shards")
    COUNT: ClassVar[str] = "conversations"

    def check(self) -> list[tuple[str, str]]:
        if self.kind == "shards" and not self.conversations:
            return [("conversations", "missing required value: how many documents to draw from the shards")]
        if self.kind in BUILTINS and (self.conversations or 0) > MAX_BUILTIN:
            return [("conversations", f"{self.conversations:,}: the built-in sets make at most {MAX_BUILTIN:,} (they "
                                      "are held in memory); a larger set belongs in a file")]
        return super().check()


def read(source: ChatSource, seed: int, tok) -> list:
    """A source's items: conversations (lists of messages), or for `shards` plain documents (str)."""
    if source.kind == "jsonl":
        return read_conversations(source.path)
    if source.kind == "datasets":
        return read_conversations(source.path, source.split)
    if source.kind == "shards":
        return shard_documents(source.path, tok, source.conversations, seed)
    return builtin(source.kind, source.conversations, seed)


def key(item) -> str:
    """The text a mixture splits an item by (data/mixture.py)."""
    return item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)


def shard_documents(path, tok, n: int, seed: int) -> list[str]:
    """`n` documents of a tokenize output's training shards, drawn at random (seeded), decoded: the plain text a
    fine-tuning mixture replays so that the model keeps what it was pretrained on."""
    from pathlib import Path

    from mmctl.tokenizer.shards import Shards

    shards = Shards(Path(path) / "shards", "train")
    if shards.tokenizer_sha256 != tok.sha256:
        raise DataError(f"{path}: its shards were written by another tokenizer than the base model's")
    documents = [doc for i in range(len(shards.arrays)) for doc in shards.documents_of(i)]
    picked = random.Random(f"replay:{seed}").sample(range(len(documents)), min(n, len(documents)))
    return [tok.decode(documents[i][:-1].tolist()) for i in sorted(picked)]  # each ends with <|eos|>


def builtin(name: str, n: int, seed: int) -> list[list[dict]]:
    """Offline chat sets from the project's generators, with exact answers:
    `arithmetic` — "What is 47 + 18?" → "7+8=15, 4+1+1=6, so 65" (worked digit by digit), from the training part
    of the problem space only (the held-out tenth that `mmctl eval` scores never appears); `story-questions` — a
    fresh tiny story and a question about it (who helped, what was found, where, which animal) → a one-word
    answer."""
    from mmctl.data.synthetic import arithmetic_problems, story_questions

    if name == "arithmetic":
        return [[{"role": "user", "content": p.question}, {"role": "assistant", "content": p.working()}]
                for p in arithmetic_problems(n, seed, split="train")]
    if name == "story-questions":
        return [[{"role": "user", "content": f"{story}\n\nQuestion: {question}"},
                 {"role": "assistant", "content": answer}] for story, question, answer in story_questions(n, seed)]
    raise DataError(f"unknown built-in chat set {name!r}; built-ins: {', '.join(BUILTINS)}")


def read_conversations(path, split: str | None = None) -> list[list[dict]]:
    """Every conversation of a JSONL file — or, with a split, of a datasets directory — whichever format each
    record is in."""
    from mmctl.data import jsonl
    from mmctl.data.sources import dataset_records

    records = jsonl.records(path) if split is None else dataset_records(str(path), split)
    out = [conversation(record, where) for where, record in records]
    if not out:
        raise DataError(f"{path}: no conversations")
    return out


@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 where the token is trained (as a target: predicted from what comes before)


def encode(item, tok, train_on_prompt: bool = False) -> Example:
    """A conversation through the chat template (the assistant's tokens trained, or every token with
    `train_on_prompt`), or a plain document as pretraining saw it (its text, then <|eos|>; every token trained)."""
    from mmctl.data.chat import tokenize

    if isinstance(item, str):
        ids = tok.encode(item) + [tok.eos_id]
        return Example(ids, [1] * len(ids))
    ids, mask = tokenize(item, tok)
    return Example(ids, [1] * len(ids) if train_on_prompt else mask)


@dataclass
class Rows:
    """(B, seq_len + 1) ids; `trained` (B, seq_len) marks the targets ids[:, 1:] that count in the loss;
    `document_ids` (B, seq_len) numbers the conversations within each row's inputs (packing only)."""

    ids: list[list[int]]
    trained: list[list[int]]
    document_ids: list[list[int]] | None
    cut: int  # conversations cut short to fit a row
    sources: list[list[int]]  # each row's conversations, as indices into the examples it was made from


def pack(examples: list[Example], seq_len: int, pad_id: int) -> Rows:
    """Conversations back to back in rows of seq_len + 1 tokens, placed by best-fit decreasing (TRL's `bfd`):
    longest first, each into the row it fills most tightly, else a new row. Filling rows in reading order
    instead leaves a row's tail empty whenever the next conversation does not fit (about a fifth of the tiny
    recipe's tokens). The rest of a row is padding with a document of its own and no trained token."""
    import bisect

    size = seq_len + 1
    for example in examples:
        if not example.ids or len(example.ids) != len(example.mask):
            raise DataError("an encoded conversation is empty or its mask does not match its tokens")
    members: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the tightest row that fits is found by bisection
    for i in sorted(range(len(examples)), key=lambda i: -min(len(examples[i].ids), size)):
        n = min(len(examples[i].ids), size)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, row = free.pop(k)
        else:
            room, row = size, len(members)
            members.append([])
        members[row].append(i)
        if room > n:
            bisect.insort(free, (room - n, row))
    out = Rows([], [], [], sum(len(e.ids) > size for e in examples), members)
    for row in members:
        ids, mask, docs = [], [], []
        for document, i in enumerate(row):
            e_ids, e_mask = examples[i].ids[:size], examples[i].mask[:size]
            # the first token of a conversation is never a target: it is not predicted from the one before
            ids, mask, docs = ids + e_ids, mask + [0] + e_mask[1:], docs + [document] * len(e_ids)
        pad = size - len(ids)
        out.ids.append(ids + [pad_id] * pad)
        out.trained.append((mask + [0] * pad)[1:])
        out.document_ids.append((docs + [docs[-1] + 1] * pad)[:-1])
    return out


def pad(examples: list[Example], seq_len: int, pad_id: int) -> Rows:
    """One conversation per row, right-padded (cut at seq_len + 1 tokens)."""
    out = Rows([], [], None, sum(len(e.ids) > seq_len + 1 for e in examples), [[i] for i in range(len(examples))])
    for e in examples:
        ids, mask = e.ids[: seq_len + 1], e.mask[: seq_len + 1]
        n = seq_len + 1 - len(ids)
        out.ids.append(ids + [pad_id] * n)
        out.trained.append((mask + [0] * n)[1:])
    return out
