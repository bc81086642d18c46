"""Perplexity and bits per byte with rolling windows (lm-eval's `loglikelihood_rolling`).

Each document is scored token by token, starting after an <|eos|> (the separator every document follows in
training). Windows of the model's context move `stride` tokens at a time; each window scores only the tokens
the previous one did not, with the rest as context — stride = context gives disjoint windows, a smaller stride
more context per token at more cost. Reports token perplexity, word perplexity (per whitespace-separated word)
and bits per byte (per UTF-8 byte: comparable across tokenizers), summed over all documents. `mmctl pretrain`'s
validation loss and bits per byte are this same computation on the first documents of the val split.
"""

from __future__ import annotations

import math
from pathlib import Path

from mmctl.errors import DataError
from mmctl.evals.scoring import loglikelihoods
from mmctl.evals.tasks import TaskConfig


def rolling_requests(ids: list[int], prefix: int, max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that together score every token of `ids` exactly once."""
    requests = []
    done = 0
    seq = [prefix] + ids
    while done < len(ids):
        end = min(done + stride, len(ids)) if done else min(max_length, len(ids))
        start = max(0, end + 1 - (max_length + 1))  # window seq[start : end + 1] holds ≤ max_length + 1 tokens
        requests.append((seq[start:done + 1], seq[done + 1:end + 1]))
        done = end
    return requests


def evaluate(model, tok, task: TaskConfig, documents: list[str], *, batch_size: int, seed: int,
             stats: dict) -> tuple[dict, list[dict]]:
    max_length = model.cfg.max_position_embeddings
    return score(model, tok, documents, max_length=max_length, stride=min(task.stride or max_length, max_length),
                 batch_size=batch_size, stats=stats, label=f"tasks: {task.label}")


def score(model, tok, documents: list[str], *, max_length: int, stride: int, batch_size: int = 8,
          stats: dict | None = None, label: str = "perplexity") -> tuple[dict, list[dict]]:
    """Perplexities and bits per byte of `documents`, in windows of `max_length` tokens moved `stride` at a time.

    The one implementation: `mmctl eval`'s perplexity tasks and `mmctl pretrain`'s validation both call it.
    """
    requests, owners = [], []
    for i, doc in enumerate(documents):
        for request in rolling_requests(tok.encode(doc), tok.eos_id, max_length, stride):
            requests.append(request)
            owners.append(i)
    scores = loglikelihoods(model, requests, batch_size=batch_size, max_length=max_length, stats=stats)
    nats = [0.0] * len(documents)
    tokens = [0] * len(documents)
    for owner, s in zip(owners, scores, strict=True):
        nats[owner] -= s.logprob
        tokens[owner] += s.tokens
    total_nats, total_tokens = sum(nats), sum(tokens)
    if not total_tokens:
        raise DataError(f"{label}: the documents are empty (no tokens to score)")
    words = sum(len(doc.split()) for doc in documents)
    nbytes = sum(len(doc.encode("utf-8")) for doc in documents)
    samples = [{"document": doc[:200], "tokens": t, "nats": n, "perplexity": math.exp(n / t) if t else None}
               for doc, t, n in zip(documents, tokens, nats, strict=True)]
    return {"token_perplexity": math.exp(total_nats / total_tokens),
            "word_perplexity": math.exp(total_nats / words) if words else None,
            "bits_per_byte": total_nats / math.log(2) / nbytes, "nats_per_token": total_nats / total_tokens,
            "tokens": total_tokens, "n": len(documents)}, samples


def shard_documents(directory: str | Path, split: str, tok, max_tokens: int | None = None) -> list[str]:
    """The documents of a `mmctl tokenize` shard split, decoded — the first ones holding `max_tokens` tokens
    (all of them if None). Refuses shards written by another tokenizer than `tok`."""
    from mmctl.tokenizer.shards import Shards

    shards = Shards(directory, split)
    if shards.tokenizer_sha256 != tok.sha256:
        raise DataError(f"{directory}: written by another tokenizer than the checkpoint's (sha256 "
                        f"{shards.tokenizer_sha256[:12]}… vs {tok.sha256[:12]}…)")
    documents, count = [], 0
    for i in range(len(shards.arrays)):
        for doc in shards.documents_of(i):
            if max_tokens is not None and count >= max_tokens:
                return documents
            documents.append(tok.decode(doc[:-1].tolist()))  # each document ends with <|eos|>
            count += len(doc)
    return documents
