"""Encoding on every core: batches of documents go to worker processes and come back in order, so the shards are
byte for byte those of one process (the batches are the same; only who encodes them changes).

The tokenizers library parallelises inside `encode_batch` too, but on this kind of short-document corpus its
threads gain little (1.2× on 2 cores, measured in benchmarks/tokenize.md); whole processes, one thread each,
encode separate batches while the main process reads the corpus and writes the shards. At most two batches per
worker are in flight, so memory stays bounded by the batch, not the corpus.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from mmctl.errors import UsageError

_TOKENIZER = None  # each worker's own copy, loaded once


def count(workers: int | str) -> int:
    """`auto` → the CPUs this process may use; a number → itself."""
    if workers == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(workers)


def encode_in_order(tok, batches: Iterable[list], dtype, workers: int) -> Iterator[tuple[list, list[np.ndarray]]]:
    """(batch, its documents' ids) for each batch of (split, document) pairs, in the order given."""
    if workers <= 1:
        for batch in batches:
            yield batch, tok.encode_batch([doc for _, doc in batch], dtype=dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    context = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited threads or locks
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_start,
                                 initargs=(str(tok.path), np.dtype(dtype).str)) as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append((batch, pool.submit(_encode, [doc for _, doc in batch])))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
    except BrokenProcessPool:
        raise UsageError("an encoding worker process died (out of memory?); nothing was published — run again with "
                         "shards.workers: 1") from None


def _start(tokenizer_dir: str, dtype: str) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    from mmctl.tokenizer import bpe

    _TOKENIZER = (bpe.load(tokenizer_dir), np.dtype(dtype))


def _encode(documents: list[str]) -> list[np.ndarray]:
    tok, dtype = _TOKENIZER
    return tok.encode_batch(documents, dtype=dtype)
