"""Decode speed: mmctl's `generate` vs transformers' `generate`, same checkpoint, one process, CPU.

A random 12.6M-parameter Llama (and two smaller ones) is saved as an HF checkpoint dir and loaded by both
libraries. Both decode greedily for the same number of new tokens from the same left-padded prompts, and must
produce the same tokens. Decode tokens/s is measured the same way for both, from wall-clock time:
(time for N new tokens − time for 1 new token) covers exactly the N − 1 decode steps, so prefill is excluded
without relying on either library's own timers. Warm-up runs are excluded; each number is the median of
--repeats runs.

    python benchmarks/generate.py    # prints the table recorded in benchmarks/generate.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

from mmctl.generate import SamplingConfig, generate  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer, load_checkpoint, save_checkpoint  # noqa: E402

# The benchmark model, and two smaller ones that show where Python overhead, not memory bandwidth, sets the pace.
MODELS = {
    "13M": ModelConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                       num_kv_heads=2, max_position_embeddings=1024),
    "5M": ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=672, num_layers=6, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=1024),
    "0.4M": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=2,
                        num_kv_heads=1, max_position_embeddings=1024),
}


def prompts_for(batch: int, vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [16 - (i % 4) * 2 for i in range(batch)]  # 16, 14, 12, 10, …: left padding is exercised
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def run_mmctl(model, prompts, new_tokens):
    g = generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens))
    return [c.ids for c in g.completions]


def run_hf(model, prompts, new_tokens):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[:, T:].tolist()


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def decode_rates(ours, theirs, prompts, new_tokens, repeats) -> tuple[float, float]:
    """Median decode tokens/s of each library over `repeats` runs, after one warm-up run each. The two libraries
    alternate within every repeat, so a noisy neighbour on the machine slows both alike."""
    runs = ((run_mmctl, ours), (run_hf, theirs))
    for fn, model in runs:
        fn(model, prompts, new_tokens)
    rates: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for (fn, model), out in zip(runs, rates, strict=True):
            full, first = timed(fn, model, prompts, new_tokens), timed(fn, model, prompts, 1)
            out.append(len(prompts) * (new_tokens - 1) / (full - first))
    return statistics.median(rates[0]), statistics.median(rates[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"fp32, {args.threads} threads, greedy, {args.new_tokens} new tokens, prompts of 10-16 tokens, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print("| model | batch | mmctl tok/s | transformers tok/s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Transformer(cfg), tmp)
            ours = load_checkpoint(tmp)
            theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        params = sum(p.numel() for p in ours.parameters())
        for batch in (1, 8) if name == "13M" else (1,):
            prompts = prompts_for(batch, cfg.vocab_size)
            if run_mmctl(ours, prompts, 16) != run_hf(theirs, prompts, 16):
                raise SystemExit(f"{name}, batch {batch}: the two libraries generated different tokens")
            with torch.inference_mode():
                a, b = decode_rates(ours, theirs, prompts, args.new_tokens, args.repeats)
            print(f"| {name} ({params / 1e6:.2f}M params) | {batch} | {a:.0f} | {b:.0f} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
