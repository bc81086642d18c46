"""The decoding thread behind `mmctl serve`: one bounded queue of pending completions, decoded in batches.

`submit` queues a request's choices (or refuses them all with QueueFull past `queue_limit`, so memory stays
bounded); the thread takes the oldest waiting choice and up to `batch_size - 1` more that decode alike — the same
sampling settings, and room in the context for the longest — and decodes them as one left-padded batch through
`Session.complete` (mmctl/session.py), each choice's text streamed back to the asyncio loop that asked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mmctl.generate import SamplingConfig


class QueueFull(Exception):
    def __init__(self, waiting: int):
        super().__init__(f"{waiting} requests waiting")
        self.waiting = waiting


@dataclass
class Pending:
    """One choice of one request: its prompt, how to decode it, and where its text goes (an asyncio queue of
    (index, text piece | Reply | Exception), filled from the decoding thread)."""

    ids: list[int]
    sampling: SamplingConfig  # max_new_tokens: this choice's own limit
    index: int
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    pixels: Any = None

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, (self.index, item))

    def key(self) -> SamplingConfig:
        """What rows of one batch share: everything but the length and the seed (a batch samples from its first
        row's generator — a seed makes a request repeatable when it decodes alone)."""
        return dataclasses.replace(self.sampling, max_new_tokens=1, seed=0)


@dataclass
class Batcher:
    """Decodes what `submit` queues, `batch_size` choices at a time; at most `queue_limit` wait."""

    session: Any
    batch_size: int = 8
    queue_limit: int = 256
    waiting: deque = field(default_factory=deque)
    ready: threading.Condition = field(default_factory=threading.Condition)
    gather: float = 0.02  # seconds a batch waits to fill
    stopped: bool = False
    answered: int = 0

    def start(self) -> None:
        threading.Thread(target=self._work, name="mmctl-decode", daemon=True).start()

    def stop(self) -> None:
        with self.ready:
            self.stopped = True
            self.ready.notify()

    def submit(self, choices: list[Pending]) -> None:
        """Queue `choices` (all of them, or none: QueueFull when they would pass the limit)."""
        with self.ready:
            if len(self.waiting) + len(choices) > self.queue_limit:
                raise QueueFull(len(self.waiting))
            self.waiting.extend(choices)
            self.ready.notify()

    def _next_batch(self) -> list[Pending]:
        """The oldest waiting choice and the next ones that decode with it (the rest keep their place). A batch that
        would not be full waits up to `gather` seconds for more: clients answered together ask again a moment
        apart, and a batch started on the first of them would make the others wait for all of its tokens."""
        with self.ready:
            while not self.waiting and not self.stopped:
                self.ready.wait()
            deadline = time.monotonic() + self.gather
            while len(self.waiting) < self.batch_size and not self.stopped and time.monotonic() < deadline:
                self.ready.wait(deadline - time.monotonic())
            if self.stopped:
                return []
            batch, rest = [self.waiting.popleft()], deque()
            longest, most = len(batch[0].ids), batch[0].sampling.max_new_tokens
            while self.waiting and len(batch) < self.batch_size:
                p = self.waiting.popleft()
                fits = max(longest, len(p.ids)) + max(most, p.sampling.max_new_tokens) <= self.session.context
                if p.key() == batch[0].key() and fits:
                    batch.append(p)
                    longest, most = max(longest, len(p.ids)), max(most, p.sampling.max_new_tokens)
                else:
                    rest.append(p)
            self.waiting.extendleft(reversed(rest))
            return batch

    def _work(self) -> None:
        import torch

        while batch := self._next_batch():
            limits = [p.sampling.max_new_tokens for p in batch]
            sampling = dataclasses.replace(batch[0].sampling, max_new_tokens=max(limits))
            images = [p.pixels for p in batch if p.pixels is not None]
            try:
                replies = self.session.complete([p.ids for p in batch], sampling, limits=limits,
                                                pixels=torch.stack(images) if images else None,
                                                on_text=[p.put for p in batch])
            except Exception as e:  # noqa: BLE001 - the requests get the error; the thread serves on
                for p in batch:
                    p.put(e)
                continue
            for p, reply in zip(batch, replies, strict=True):
                p.put(reply)
            self.answered += len(batch)
