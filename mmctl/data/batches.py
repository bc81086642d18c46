"""Batches: training windows from token shards, and left-padded rows for scoring and decoding.

Training windows are random, each row a pure function of (seed, step, row).

nanoGPT's sampler (a random offset per row into the token stream, windows may span document boundaries at
<|eos|>), made reproducible without any hidden state: the "data cursor" of a resumed run is just the step
number, so a resume sees exactly the batches the uninterrupted run would have seen. A step's global batch is
rows 0..B-1; each process and micro-batch takes its own slice of them, so one process accumulating two
micro-batches and two processes taking one each train on exactly the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mmctl.errors import DataError
from mmctl.tokenizer.shards import Shards


class TokenWindows:
    """Windows of `seq_len + 1` tokens (inputs and their next-token targets). Its whole state is one probability
    per shard — no per-document index — so a corpus of 1e8 documents costs what one of ten does; the tokens stay
    in the shards' memory maps and are paged in as rows read them."""

    def __init__(self, shards: Shards, seq_len: int, seed: int):
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        usable = [len(a) - seq_len - 1 for a in shards.arrays]
        if max(usable) < 0:
            raise DataError(f"{shards.directory}: every {shards.split} shard is shorter than one window of "
                            f"{seq_len + 1} tokens; lower the sequence length or add data")
        weights = np.array([max(u + 1, 0) for u in usable], dtype=np.float64)
        self.probabilities = weights / weights.sum()  # a window start is uniform over all valid positions

    def rows(self, step: int, first: int, count: int) -> np.ndarray:
        """(count, seq_len + 1) int64 token ids: rows first .. first+count-1 of step `step`'s global batch."""
        out = []
        for row in range(first, first + count):
            rng = np.random.default_rng([self.seed, step, row])
            tokens = self.shards.arrays[rng.choice(len(self.shards.arrays), p=self.probabilities)]
            start = rng.integers(0, len(tokens) - self.seq_len)
            out.append(np.asarray(tokens[start:start + self.seq_len + 1], dtype=np.int64))
        return np.stack(out)


def pick_row(seed: int, step: int, row: int, n_rows: int) -> int:
    """Which of `n_rows` examples fills position `row` of step `step`'s batch: a function of (seed, step, row)
    only, so a resumed run draws what an uninterrupted one would, on any number of processes."""
    return int(np.random.default_rng([seed, step, row]).integers(n_rows))


def row_batches(n_rows: int, seed: int, cfg, dist, make) -> Callable[[int, int], list]:
    """`batches(step, rank)` (the training loop's) for data held as `n_rows` rows: this process's micro-batches of
    `cfg` (a TrainConfig), each row drawn by `pick_row` — so one process with 2 micro-batches and 2 processes with 1
    train on the same rows — and `make(row indices)` the batch the loss takes."""
    from mmctl.train.loop import micro_batches

    per_micro, accum = micro_batches(cfg, dist.world)

    def batches(step: int, rank: int) -> list:
        firsts = [(rank * accum + m) * per_micro for m in range(accum)]
        return [make([pick_row(seed, step, r, n_rows) for r in range(first, first + per_micro)]) for first in firsts]

    return batches


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0):
    """(ids, attention_mask), both (B, T) int64 with T the longest row: each row right-aligned after padding.

    Left padding puts every row's last token at T - 1, so decoding appends one slot for all rows at once and a
    score never depends on what else shares the batch (the model masks the padding and gives each real token the
    position it would have alone). Generation and log-likelihood scoring share it.
    """
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, row in enumerate(rows):
        if len(row):
            ids[b, T - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            mask[b, T - len(row):] = 1
    return ids, mask
