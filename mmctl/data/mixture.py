"""One way to name and mix data, whatever the items are: documents (tokenize), conversations (sft), preference
pairs (dpo), problems (grpo) or images with their questions (align-vision).

A source is one entry of a recipe's `data.sources` (or a phase's `sources`): a `kind` — a file format read from
`path`, or a built-in generator — how many items (to make, or to read at most), and a `weight`. Each kind of item
has its own Source subclass beside its reader (TextSource in sources.py, ChatSource in sft.py, PairSource and
ProblemSource in rl.py, ImageSource in vqa.py); a mixture is the same for all of them (nanochat's TaskMixture,
with tokenize's split rule):

- the validation share is chosen by content — an item goes to `val` when a seeded hash of its key (its text)
  falls under `val_fraction` — so a repeated item always lands on the same side and the split does not depend
  on the order or on the other sources;
- weights are repetition counts for the training part: weight 2 uses each training item twice, 0.5 a seeded
  half of them (GPT-3's "epochs per source"); validation items are never repeated;
- `mix` shuffles the training items of every source together, seeded; `stream` yields them in source order
  without holding them (a corpus larger than memory).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from mmctl.errors import DataError
from mmctl.recipe import option

Read = Callable[[Any, int], Iterable]  # (source, its index in the list) → its items


@dataclass
class Source:
    """What every source has; a subclass narrows `kind` to its kinds and adds its count (and options)."""

    kind: str = option(None, "the format read from path, or a built-in generator", required=True)
    path: str | None = option(None, "the file or directory a file kind reads")
    split: str = option("train", "datasets: the split to read")
    weight: float = option(1.0, "mixture weight: each training item is used this many times (0.5: a seeded half)",
                           gt=0, le=1000)

    FILES: ClassVar[tuple[str, ...]] = ("jsonl", "datasets")  # the kinds read from `path`; the others are built in
    COUNT: ClassVar[str] = "items"  # the field saying how many items to make (built-ins) or read at most (files)

    @property
    def limit(self) -> int | None:
        return getattr(self, self.COUNT)

    def check(self) -> list[tuple[str, str]]:
        if self.kind in self.FILES and not self.path:
            return [("path", f"missing required value: a {self.kind} source needs a path")]
        if self.kind not in self.FILES and self.path:
            return [("path", f"a {self.kind} source is built in and takes no path")]
        if self.kind not in self.FILES and not self.limit:
            return [(self.COUNT, f"missing required value: how many {self.kind} {self.COUNT} to make")]
        return []

    def describe(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else f"{self.kind}({self.limit or 'all'})"


def stream(sources: list[Source], read: Read, seed: int, val_fraction: float,
           key: Callable[[Any], str] = str) -> Iterator[tuple[str, int, Any]]:
    """(split, source index, item) for every item of every source, weighted and split, in source order."""
    for index, source in enumerate(sources):
        count = 0
        for item in itertools.islice(read(source, index), source.limit):
            count += 1
            text = key(item)
            if unit(seed, "split", text) < val_fraction:
                yield "val", index, item
                continue
            copies = int(source.weight) + (unit(seed, f"weight{index}", text) < source.weight % 1)
            for _ in range(copies):
                yield "train", index, item
        if count == 0:
            raise DataError(f"{source.describe()}: the source has no {source.COUNT}")


def mix(sources: list[Source], read: Read, seed: int, val_fraction: float,
        key: Callable[[Any], str] = str) -> tuple[list, list]:
    """(training items shuffled together, validation items): `stream`, held in memory."""
    train, val = [], []
    for split, _, item in stream(sources, read, seed, val_fraction, key):
        (train if split == "train" else val).append(item)
    random.Random(f"mix:{seed}").shuffle(train)
    return train, val


def unit(seed: int, salt: str, text: str) -> float:
    """A number in [0, 1) fixed by (seed, salt, text): reproducible on every machine, unlike hash()."""
    digest = hashlib.blake2b(f"{seed}:{salt}:".encode() + text.encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64
