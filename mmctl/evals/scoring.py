"""Log-likelihood of continuations, batched: the one primitive perplexity and multiple choice are built on.

A request is (context ids, continuation ids); its score is Σ log p(continuation token | everything before),
and whether every continuation token is the greedy choice (lm-eval's `is_greedy`). Requests are sorted by
length and batched with LEFT padding, an attention mask and per-row positions, so each row computes what it
would compute alone: padding never changes a score (the batch-size dependence of lm-eval #1645, #704 and
nanoVLM's right-padded wrapper). Sequences longer than the window keep their last `max_length` tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from mmctl.data.batches import left_pad


@dataclass(frozen=True)
class Score:
    logprob: float  # Σ log p over the continuation tokens, in nats
    greedy: bool  # every continuation token was the argmax
    tokens: int  # continuation tokens scored


def loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 8,
                   max_length: int | None = None, stats: dict | None = None) -> list[Score]:
    """Scores for each (context, continuation) in order. `stats` (optional) receives tokens and seconds."""
    import torch

    max_length = max_length or model.cfg.max_position_embeddings
    device = model.device
    rows = []
    for i, (context, continuation) in enumerate(requests):
        if not continuation:
            raise ValueError(f"request {i}: empty continuation")
        full = list(context) + list(continuation)
        window = full[-(max_length + 1):]  # inputs are window[:-1], targets window[1:]
        rows.append((i, window, min(len(continuation), len(window) - 1)))
    order = sorted(rows, key=lambda r: -len(r[1]))  # similar lengths together: less padding
    results: list[Score | None] = [None] * len(requests)
    start, tokens = time.perf_counter(), 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            ids, mask = left_pad([w[:-1] for _, w, _ in batch])
            targets, _ = left_pad([w[1:] for _, w, _ in batch])
            T = ids.shape[1]
            logits = model(ids.to(device), attention_mask=mask.to(device)).float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()  # (B, T, V)
            for r, (index, _, n_cont) in enumerate(batch):
                lp = logprobs[r, T - n_cont:]
                tgt = targets[r, T - n_cont:]
                picked = lp.gather(-1, tgt[:, None]).squeeze(-1)
                results[index] = Score(float(picked.double().sum()), bool((lp.argmax(-1) == tgt).all()), n_cont)
                tokens += int(mask[r].sum())
    if was_training:
        model.train()
    if stats is not None:
        stats["tokens"] = stats.get("tokens", 0) + tokens
        stats["seconds"] = stats.get("seconds", 0.0) + time.perf_counter() - start
    return results
