"""Speculative decoding against plain greedy decoding, batch 1, in one process: a target checkpoint and a draft with
the same tokenizer (by default the tiny pretrained model and its one-layer sibling, recipes/tiny/pretrain-draft.yaml:
`make -C recipes/tiny draft` after the pipeline). Every prompt is decoded both ways and must give the same tokens.
Reported per k (draft tokens per check): the acceptance rate, tokens per target forward, decode tokens/s (after
the prefill, the median of --repeats runs after a warm-up) and the speed-up over plain greedy decoding; and what
one forward of each model costs at one token, which bounds the speed-up.

    python benchmarks/speculative.py    # prints the table recorded in benchmarks/speculative.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmctl import checkpoints, speculative
from mmctl.generate import SamplingConfig, generate
from mmctl.models import fast_decode

PROMPTS = ["Once upon a time", "One day, a little", "Tom was", "The dog ran to the", "She said,",
           "In the park there was", "Lily and Ben", "After lunch,"]


def plain(model, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """Greedy decoding's tokens and its decode time (the time for `tokens` minus the time for one: no prefill)."""
    def run(n):
        start = time.perf_counter()
        out = generate(model, [prompt], SamplingConfig(max_new_tokens=n)).completions[0].ids
        return out, time.perf_counter() - start
    ids, full = run(tokens)
    return ids, full - run(1)[1]


def forward_ms(model, tokens: int = 1, repeats: int = 50) -> float:
    """One forward over `tokens` new tokens against a 32-token cache (1: a decode step; k + 1: a check), in
    milliseconds (median)."""
    cache = model.new_cache(1, 64)
    with torch.no_grad():
        model(torch.arange(1, 33)[None], cache=cache)
        times = []
        for _ in range(repeats):
            cache.length = 32
            start = time.perf_counter()
            model(torch.full((1, tokens), 5), cache=cache)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="recipes/tiny/out/pretrain/model")
    parser.add_argument("--draft", default="recipes/tiny/out/pretrain-draft/model")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    target, tok = checkpoints.load(args.target)
    draft, _ = checkpoints.load(args.draft)
    for model in (target, draft):  # as `mmctl generate` loads them: plain decoding and the draft's guesses fast
        fast_decode.fuse(model)
    prompts = [tok.encode(p) for p in PROMPTS]
    with torch.no_grad():
        expected = [plain(target, p, args.tokens)[0] for p in prompts]  # (also the warm-up)
        base = statistics.median(sum(plain(target, p, args.tokens)[1] for p in prompts) for _ in range(args.repeats))
        decoded = sum(len(e) - 1 for e in expected)
        print(f"target {args.target}: {target.cfg.num_parameters() / 1e6:.1f}M parameters, one-token forward "
              f"{forward_ms(target):.2f} ms; draft {args.draft}: {draft.cfg.num_parameters() / 1e6:.1f}M, "
              f"{forward_ms(draft):.2f} ms")
        print("\n| k | acceptance rate | tokens per target forward | target check (k + 1 tokens) ms | decode tokens/s "
              "| vs plain greedy |")
        print("|---|---|---|---|---|---|")
        print(f"| plain greedy | | 1.00 | {forward_ms(target):.2f} (1 token) | {decoded / base:.0f} | 1.00× |")
        for k in args.k:
            runs = []
            for _ in range(args.repeats):
                results = [speculative.generate(target, draft, p, args.tokens, k=k) for p in prompts]
                assert [r.completion.ids for r in results] == expected, "speculative ≠ plain greedy"
                runs.append(results)
            seconds = statistics.median([sum(r.seconds for r in results) for results in runs])
            results = runs[0]
            drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
            forwards = sum(r.target_forwards for r in results)
            tokens = sum(len(r.completion.ids) for r in results)
            # the speculative clock starts after the prefill's first token, as plain's does: the same tokens timed
            print(f"| {k} | {accepted / drafted:.2f} | {tokens / forwards:.2f} | {forward_ms(target, k + 1):.2f} | "
                  f"{decoded / seconds:.0f} | {base / seconds:.2f}× |")


if __name__ == "__main__":
    main()
