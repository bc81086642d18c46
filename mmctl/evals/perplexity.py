"""Perplexity and bits per byte with rolling windows (lm-eval's `loglikelihood_rolling`).

Each document is scored token by token, starting after an <|eos|> (the separator every document follows in
training). Windows of the model's context move `stride` tokens at a time; each window scores only the tokens
the previous one did not, with the rest as context — stride = context gives disjoint windows, a smaller stride
more context per token at more cost. Reports token perplexity, word perplexity (per whitespace-separated word)
and bits per byte (per UTF-8 byte: comparable across tokenizers), summed over all documents.
"""

from __future__ import annotations

import math

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
    stride = min(task.stride or max_length, max_length)
    requests, owners = [], []
    for i, doc in enumerate(documents):
        for request in rolling_requests(tok.encode(doc), tok.eos_id, max_length, stride):
            requests.append(request)
            owners.append(i)
    scores = loglikelihoods(model, requests, batch_size=batch_size, max_length=max_length, stats=stats)
    nats = [0.0] * len(documents)
    tokens = [0] * len(documents)
    for owner, score in zip(owners, scores, strict=True):
        nats[owner] -= score.logprob
        tokens[owner] += score.tokens
    total_nats, total_tokens = sum(nats), sum(tokens)
    if not total_tokens:
        raise DataError(f"tasks: {task.label}: the documents are empty (no tokens to score)")
    words = sum(len(doc.split()) for doc in documents)
    nbytes = sum(len(doc.encode("utf-8")) for doc in documents)
    samples = [{"document": doc[:200], "tokens": t, "nats": n, "perplexity": math.exp(n / t) if t else None}
               for doc, t, n in zip(documents, tokens, nats, strict=True)]
    return {"token_perplexity": math.exp(total_nats / total_tokens),
            "word_perplexity": math.exp(total_nats / words) if words else None,
            "bits_per_byte": total_nats / math.log(2) / nbytes, "nats_per_token": total_nats / total_tokens,
            "tokens": total_tokens, "n": len(documents)}, samples
