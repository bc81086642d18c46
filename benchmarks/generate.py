"""Decode speed: mmctl's `generate` vs transformers' `generate`, same checkpoint, one process, CPU.

Random Llamas (the tiny recipe's 4.0M model, a 12.6M one bound by reading its weights, a 0.4M one where only
overhead is left) are saved as HF checkpoint dirs and loaded by both libraries, in fp32 and bf16. mmctl loads as
`mmctl generate` does (`fast_decode.fuse`), and decodes eagerly and through `torch.compile` (`--compile`). All
decode greedily for the same number of new tokens from the same left-padded prompts, and must produce the same
tokens. Decode tokens/s is measured the same way for all, from wall-clock time: (time for N new tokens − time for
1 new token) covers exactly the N − 1 decode steps, so prefill is excluded without relying on either library's
own timers. Warm-up runs (and the compile) are excluded; each number is the median of --repeats runs, the
contenders taking turns within each repeat.

The roofline: a batch-1 step must read every weight once, so weight bytes × tokens/s is the memory traffic it
needs, set against the bandwidth of a 256 MB copy in the same process (bytes read + written per second, STREAM's
convention).

    python benchmarks/generate.py            # prints the table recorded in benchmarks/generate.md
    python benchmarks/generate.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# inductor keeps compiled kernels on disk and a later process reuses them (a compile then takes about a second):
# a fresh cache dir makes every compile here a first one, which is what the compile column reports
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmctl-bench-inductor-")

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

from mmctl import checkpoints  # noqa: E402
from mmctl.generate import SamplingConfig, generate  # noqa: E402
from mmctl.models import fast_decode  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402

MODELS = {
    "4M (tiny recipe)": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4,
                                    num_heads=8, num_kv_heads=4, max_position_embeddings=512),
    "13M": ModelConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                       num_kv_heads=2, max_position_embeddings=1024),
    "0.4M": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=2,
                        num_kv_heads=1, max_position_embeddings=1024),
}
BATCHES = {"4M (tiny recipe)": (1, 8), "13M": (1, 8), "0.4M": (1,)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prompts_for(batch: int, vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [16 - (i % 4) * 2 for i in range(batch)]  # 16, 14, 12, 10, …: left padding is exercised
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def run_mmctl(model, prompts, new_tokens, compile=False):
    g = generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens), compile=compile)
    return [c.ids for c in g.completions]


def run_hf(model, prompts, new_tokens):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[:, T:].tolist()


def common_prefix(ours: list[list[int]], theirs: list[list[int]]) -> int:
    """Tokens every row agrees on before the first difference. In bf16 the two libraries round differently (fused
    products, another order of additions), and greedy paths part once two logits are within a rounding step."""
    return min(next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), len(x))
               for x, y in zip(ours, theirs, strict=True))


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def decode_rates(runs: dict, prompts, new_tokens, repeats) -> dict[str, float]:
    """Median decode tokens/s of each contender over `repeats` runs (after a warm-up run each, which also
    compiles). The contenders alternate within every repeat, so a noisy neighbour slows all alike."""
    for fn in runs.values():
        fn(prompts, new_tokens)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            full, first = timed(fn, prompts, new_tokens), timed(fn, prompts, 1)
            rates[name].append(len(prompts) * (new_tokens - 1) / (full - first))
    return {name: statistics.median(r) for name, r in rates.items()}


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 256 MB copy (best of 5)."""
    a = torch.ones(64 * 2**20)
    b = torch.empty_like(a)
    best = min(timed(b.copy_, a) for _ in range(6))
    return 2 * a.numel() * a.element_size() / best


def gemv_rate(model) -> float:
    """Steps per second of the bare matrix products of one batch-1 step — every fused weight times one row,
    nothing else: the ceiling this BLAS sets on the step, whatever the rest of the code does."""
    weights = [model.lm_head.weight]
    for block in model.model.layers:
        weights += [block.self_attn.qkv_weight, block.self_attn.o_proj.weight, block.mlp.gate_up_weight,
                    block.mlp.down_proj.weight]
    inputs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in weights]

    def products():
        for x, w in zip(inputs, weights, strict=True):
            torch.nn.functional.linear(x, w)

    with torch.inference_mode():
        products()
        return 1 / statistics.median(timed(products) for _ in range(50))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head is one parameter


def measure(name: str, cfg: ModelConfig, dtype_name: str, new_tokens: int, repeats: int, bandwidth: float):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.save(Transformer(cfg), tmp)
        ours = checkpoints.load_lm(tmp, dtype=dtype)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    fast_decode.fuse(ours)
    rows = []
    for batch in BATCHES[name]:
        prompts = prompts_for(batch, cfg.vocab_size)
        compile_s = generate(ours, prompts, SamplingConfig(max_new_tokens=new_tokens), compile=True).compile_seconds
        reference = run_hf(theirs, prompts, new_tokens)
        agree = min(common_prefix(run_mmctl(ours, prompts, new_tokens, compile), reference) for compile in (0, 1))
        if dtype == torch.float32 and agree < new_tokens:
            raise SystemExit(f"{name}, batch {batch}: mmctl and transformers generated different tokens")
        with torch.inference_mode():
            r = decode_rates({"transformers": lambda p, n: run_hf(theirs, p, n),
                              "eager": lambda p, n: run_mmctl(ours, p, n),
                              "compiled": lambda p, n: run_mmctl(ours, p, n, True)}, prompts, new_tokens, repeats)
        saved = 1 / r["eager"] - 1 / r["compiled"]  # seconds per token the compiled step saves
        rows.append({"model": name, "params": sum(p.numel() for p in ours.parameters()), "dtype": dtype_name,
                     "batch": batch, "same_tokens": agree, "transformers": r["transformers"], "eager": r["eager"],
                     "compiled": r["compiled"], "compile_s": compile_s,
                     "break_even_tokens": compile_s / saved * batch if saved > 0 else None,
                     "weight_mb": weight_bytes(ours) / 1e6,
                     "roofline": weight_bytes(ours) * r["compiled"] / batch / bandwidth,
                     "gemv_roofline": weight_bytes(ours) * gemv_rate(ours) / bandwidth})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    print(f"{args.threads} threads, greedy, {args.new_tokens} new tokens, prompts of 10-16 tokens, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; 256 MB copy: {bandwidth / 1e9:.1f} GB/s "
          "(read + write)")
    print("| model | dtype | batch | transformers tok/s | mmctl eager tok/s | mmctl compiled tok/s | compile s | "
          "break-even tokens | same tokens | weights MB | compiled: % of roofline | bare GEMVs: % of roofline |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, cfg in MODELS.items():
        for dtype_name in DTYPES:
            for row in measure(name, cfg, dtype_name, args.new_tokens, args.repeats, bandwidth):
                rows.append(row)
                t = row["transformers"]
                even = f"{row['break_even_tokens']:,.0f}" if row["break_even_tokens"] else "never"
                print(f"| {name} | {dtype_name} | {row['batch']} | {t:.0f} | {row['eager']:.0f} "
                      f"({row['eager'] / t:.2f}×) | {row['compiled']:.0f} ({row['compiled'] / t:.2f}×) | "
                      f"{row['compile_s']:.1f} | {even} | {row['same_tokens']}/{args.new_tokens} | "
                      f"{row['weight_mb']:.1f} | "
                      + (f"{row['roofline']:.0%} | {row['gemv_roofline']:.0%}" if row["batch"] == 1 else "— | —")
                      + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_bandwidth": bandwidth, "threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
