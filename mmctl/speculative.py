"""Speculative decoding, greedy (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023): a small draft model guesses the next k tokens one by one, the target model checks all k in one
forward pass, and the longest run of guesses the target agrees with is kept, plus the target's own next token.

The output is the target's greedy decoding, token for token: every kept token is the target's argmax after the
tokens before it. What changes is the cost. A target forward over k + 1 tokens costs about what one over a single
token does when decoding is bound by reading the weights (a GPU, a large model), so each target forward yields
1 to k + 1 tokens instead of one — the acceptance rate says how many — while the draft's k small steps are the
price. On a CPU with a tiny target the forward's cost grows with its tokens, so the speed-up is smaller; the
benchmark measures it (benchmarks/speculative.md).

Both models keep a KV cache; after each check the caches are cut back to the tokens kept (a static cache's fill
level is all that moves). Batch 1, greedy only: sampling needs the rejection rule of the papers, not done here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmctl.errors import UsageError
from mmctl.generate import Completion
from mmctl.models import fast_decode
from mmctl.models.transformer import Transformer


@dataclass
class Speculation:
    completion: Completion
    drafted: int  # draft tokens proposed
    accepted: int  # of them, kept
    target_forwards: int  # after the prefill
    seconds: float  # decoding, after the prefill

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_target_forward(self) -> float | None:
        return len(self.completion.ids) / self.target_forwards if self.target_forwards else None


@torch.no_grad()
def generate(target: Transformer, draft: Transformer, prompt: Sequence[int], max_new_tokens: int, k: int = 4,
             stop_token_ids: Sequence[int] = ()) -> Speculation:
    """The target's greedy continuation of `prompt` (token ids), found with `draft`'s guesses, `k` at a time."""
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UsageError(f"the draft model's vocabulary ({draft.cfg.vocab_size}) is not the target's "
                         f"({target.cfg.vocab_size}): they must share a tokenizer")
    if not prompt:
        raise UsageError("every prompt needs at least one token")
    # a check reads the last token and at most the tokens still wanted: the caches never hold more than this
    size = len(prompt) + max_new_tokens
    for name, model in (("target", target), ("draft", draft)):
        if size > model.cfg.max_position_embeddings:
            raise UsageError(f"the prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"{name} model's context ({model.cfg.max_position_embeddings} tokens)")
    device, stops = target.device, set(stop_token_ids)
    target_cache, draft_cache = target.new_cache(1, size), draft.new_cache(1, size)
    ids = torch.tensor([list(prompt)], device=device)
    out = [int(target(ids, cache=target_cache, last_only=True)[0, -1].argmax())]
    draft(ids.to(draft.device), cache=draft_cache, last_only=True)
    unread = list(out)  # accepted tokens the draft has not read yet (the target reads each in its check)
    fast_draft = fast_decode.is_fused(draft)
    drafted = accepted = forwards = 0
    start = time.perf_counter()
    while len(out) < max_new_tokens and out[-1] not in stops:
        # k guesses, never more than the tokens still wanted
        n = min(k, max_new_tokens - len(out))
        guesses, feed = [], unread
        for _ in range(n):
            if len(feed) == 1 and fast_draft:  # one token, at position = cache length (batch 1, no padding)
                position = torch.tensor([draft_cache.length], device=draft.device)
                logits = fast_decode.decode(draft, torch.tensor(feed, device=draft.device), position, draft_cache)
            else:
                logits = draft(torch.tensor([feed], device=draft.device), cache=draft_cache, last_only=True)[:, -1]
            feed = [int(logits[0].argmax())]
            guesses.append(feed[0])
        # one target forward over the last token and the guesses: its argmax after each
        before = target_cache.length
        checked = target(torch.tensor([[out[-1], *guesses]], device=device), cache=target_cache)[0].argmax(-1)
        forwards += 1
        kept = 0
        while kept < n and guesses[kept] == int(checked[kept]):
            kept += 1
        new = guesses[:kept] + [int(checked[kept])]  # the agreed guesses, then the target's own next token
        drafted, accepted = drafted + n, accepted + kept
        target_cache.length = before + 1 + kept  # keep the last token and the agreed guesses
        draft_cache.length = before + 1 + min(kept, n - 1)  # it read the last token and all but its final guess
        unread = ([guesses[-1]] if kept == n else []) + [new[-1]]
        for token in new:
            out.append(token)
            if token in stops or len(out) == max_new_tokens:
                break
    seconds = time.perf_counter() - start
    reason = "stop" if out[-1] in stops else "length"
    completion = Completion(out, reason, out[-1] if reason == "stop" else None)
    return Speculation(completion, drafted, accepted, forwards, seconds)
