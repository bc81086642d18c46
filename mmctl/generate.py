"""Decoding: greedy and sampled generation from a batch of prompts, with a KV cache.

The one decoding loop that `mmctl generate`, eval and RL share. Prompts are left-padded into one batch, run through
one prefill, then decoded one token per row per step against a preallocated KV cache
(`mmctl.models.transformer.KVCache`). Sampling follows transformers' `generate` (repetition penalty, then
temperature, top-k, top-p, as its logits processors do), so greedy output matches `generate(do_sample=False)`
token for token. Randomness comes only from a seeded `torch.Generator`: the same seed gives the same samples.

Leaves out: beam search, min-p / typical sampling and per-row settings within a batch (speculative decoding is
mmctl/speculative.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mmctl.errors import UsageError
from mmctl.recipe import option

if TYPE_CHECKING:  # torch is imported where it is used: a config of this module must not load it (the CLI reads
    import torch  # SamplingConfig's fields for its flags, and `mmctl --help` stays instant)

    from mmctl.models.transformer import Transformer


@dataclass
class SamplingConfig:
    """How to pick tokens; usable directly as a recipe section."""

    max_new_tokens: int = option(128, "tokens to generate per prompt, at most", ge=1, le=2**20)
    temperature: float = option(0.0, "softmax temperature; 0 means greedy (always the most likely token)", ge=0,
                                 le=100)
    top_k: int = option(0, "sample only from the k most likely tokens; 0 means no limit", ge=0)
    top_p: float = option(1.0, "sample only from the most likely tokens whose probabilities sum to p (nucleus); "
                               "1 means no limit", gt=0, le=1)
    repetition_penalty: float = option(1.0, "shrink the logits of tokens already in the prompt or completion by "
                                            "this factor; 1 means off", gt=0)
    stop_strings: list[str] = option(list, "stop a completion once its text contains one of these")
    seed: int = option(0, "seed of the sampling random number generator")

    def check(self) -> list[tuple[str, str]]:
        if 0 < self.temperature < 1e-3:  # logits ÷ 1e-300 are infinite, and their softmax NaN
            return [("temperature", f"{self.temperature:g} is neither 0 (greedy) nor at least 0.001")]
        if self.top_p < 1e-3:
            return [("top_p", f"{self.top_p:g}: at least 0.001 (1 keeps every token)")]
        if not 0.01 <= self.repetition_penalty <= 100:
            return [("repetition_penalty", f"{self.repetition_penalty:g}: between 0.01 and 100 (1 is off)")]
        return []


@dataclass
class Completion:
    """One prompt's continuation. `ids` include the stop token or the tokens spelling the stop string."""

    ids: list[int]
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens reached)
    stop: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class Generation:
    completions: list[Completion]
    time_to_first_token: float  # seconds: prefill and the first pick
    decode_tokens_per_s: float | None  # tokens after the first (all rows) / time after the first; None if none
    compile_seconds: float | None = None  # with compile: the first decode step, which builds the compiled step


def process_logits(logits: torch.Tensor, sampling: SamplingConfig, seen: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Next-token logits (B, V) → the scores sampling draws from: penalized, tempered, filtered to -inf.

    `seen` (B, V) marks tokens already in each row's prompt or completion, for the repetition penalty.
    """
    import torch

    if seen is not None and sampling.repetition_penalty != 1.0:
        # CTRL (Keskar et al. 2019): dividing a negative logit would raise it, so those are multiplied instead
        p = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if sampling.temperature == 0:
        return logits
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # drop the least likely tokens whose total probability stays within 1 - p; the most likely always stays
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def pick(logits: torch.Tensor, sampling: SamplingConfig, seen: torch.Tensor | None,
         generator: torch.Generator) -> torch.Tensor:
    """One token per row (B,): argmax when greedy, else a draw from the processed distribution."""
    import torch

    scores = process_logits(logits, sampling, seen)
    if sampling.temperature == 0:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)


def _inference_mode(fn):
    """torch.inference_mode() around `fn`, torch imported only when it runs."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


@_inference_mode
def generate(model: Transformer, prompts: Sequence[Sequence[int]], sampling: SamplingConfig | None = None, *,
             stop_token_ids: Sequence[int] = (), decode: Callable[[list[int]], str] | None = None,
             on_tokens: Callable[[list[int | None]], None] | None = None, pixels=None,
             compile: bool = False) -> Generation:
    """Continue each prompt (a list of token ids). Rows stop at a stop token, a stop string or max_new_tokens.

    decode: token ids → text; needed for `stop_strings`.
    on_tokens: called after every step with each row's new token id, None for rows that already stopped
        (for streaming).
    pixels: a VLM's images (n, 3, H, W), one per expanded `<|image|>` run in the prompts, in order; they enter
        with the prefill, and decoding continues on text alone.
    compile: decode through `torch.compile` (the model must be `fast_decode.fuse`d). The first decode step
        compiles (once per batch size and cache length); its time is `compile_seconds`, and the decode rate
        counts the steps after it.

    A model prepared by `fast_decode.fuse` decodes through the fast step (mmctl/models/fast_decode.py), any other
    through its forward; both give the same tokens.
    """
    import torch

    from mmctl.data.batches import left_pad
    from mmctl.models import fast_decode

    sampling = sampling or SamplingConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    if sampling.stop_strings and decode is None:
        raise UsageError("stop strings need a decode function to turn token ids into text")
    B, T, new = len(prompts), max(len(p) for p in prompts), sampling.max_new_tokens
    context = model.cfg.max_position_embeddings
    if T + new > context:
        raise UsageError(f"the longest prompt ({T} tokens) + max_new_tokens ({new}) exceeds the model's context "
                         f"({context} tokens)")
    device = model.device
    fast = fast_decode.is_fused(model)
    if compile and not fast:
        raise UsageError("compiled decoding needs a language model prepared by fast_decode.fuse (plain floating-point "
                         "layers: not quantized, LoRA or a VLM)")

    ids, mask = (t.to(device) for t in left_pad(prompts))  # every prompt's last token at slot T-1
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, list(p)] = True
    generator = torch.Generator(device).manual_seed(sampling.seed)
    stop_ids = set(stop_token_ids)
    window = max((len(s.encode()) for s in sampling.stop_strings), default=0)  # a token spells ≥ 1 byte
    rows = torch.arange(B, device=device)

    start = time.perf_counter()
    cache = model.new_cache(B, fast_decode.cache_length(T + new, context) if compile else T + new)
    images = {} if pixels is None else {"pixels": pixels.to(device)}
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True, **images)[:, -1]  # (B, V)
    positions = mask.sum(1, keepdim=True) - 1  # (B, 1) each row's last real position
    out: list[list[int]] = [[] for _ in range(B)]
    done: list[Completion | None] = [None] * B
    first = time.perf_counter()
    compile_seconds = first_decoded = None
    for step in range(new):
        token = pick(logits, sampling, seen, generator)  # (B,)
        if step == 0:
            first = time.perf_counter()
        fresh: list[int | None] = []
        for b, t in enumerate(token.tolist()):
            if done[b] is not None:
                fresh.append(None)
                continue
            out[b].append(t)
            fresh.append(t)
            if t in stop_ids:
                done[b] = Completion(out[b], "stop", t)
            elif window:
                text = decode(out[b][-window:])
                hit = next((s for s in sampling.stop_strings if s in text), None)
                if hit is not None:
                    done[b] = Completion(out[b], "stop", hit)
        if on_tokens is not None:
            on_tokens(fresh)
        if all(d is not None for d in done) or step == new - 1:
            break
        if seen is not None:
            seen[rows, token] = True
        positions += 1
        if fast:
            logits = fast_decode.decode(model, token, positions[:, 0], cache, compile)
        else:
            logits = model(token[:, None], position_ids=positions, cache=cache)[:, -1]
        if compile and step == 0:  # leave the compile out of the decode rate (`first` has set the time to first token)
            compile_seconds, first_decoded = time.perf_counter() - first, time.perf_counter()
    end = time.perf_counter()

    completions = [d if d is not None else Completion(out[b], "length") for b, d in enumerate(done)]
    skipped = 1 if compile_seconds is None else 2  # the first token, and the one the compiling step decoded
    decoded = sum(max(len(c.ids) - skipped, 0) for c in completions)
    since = first if first_decoded is None else first_decoded
    rate = decoded / (end - since) if decoded > 0 and end > since else None
    return Generation(completions, first - start, rate, compile_seconds)


def completion_text(tok, completion: Completion, stop_strings: Sequence[str] = ()) -> str:
    """A completion's text without special tokens, cut before the first stop string: the stop string ends an
    answer but is not part of it (what eval and the lm-eval adapter score)."""
    text = tok.decode(completion.ids, skip_special_tokens=True)
    for stop in stop_strings:
        text = text.split(stop, 1)[0]
    return text
