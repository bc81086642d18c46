"""Quantized decode on a CPU: batch-1 decode speed and size of each quantization of one model, against fp32 and
bf16 weights, measured in one process.

A random Llama of `--size` (the 13M benchmark model of benchmarks/generate.py by default; its matrices are
multiples of 128, so every group size divides them) is quantized in memory by round-to-nearest (8 and 4 bits),
GPTQ's format (4 bits, act-order group indices: the same dequantization as RTN plus a gather) and bitsandbytes'
NF4, then decodes greedily from the same prompt. Decode tokens/s = (N − 1) / (time for N new tokens − time for 1),
the median of --repeats runs after a warm-up. Sizes are the bytes the linear layers store (codes, scales, zero
points, group indices; bitsandbytes' block state), relative to fp32.

    python benchmarks/quantize.py    # prints the table recorded in benchmarks/quantize.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mmctl.generate import SamplingConfig, generate
from mmctl.models.transformer import ModelConfig, Transformer
from mmctl.quant import bnb, gptq, linear

SIZES = {
    "13M": ModelConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                       num_kv_heads=2, max_position_embeddings=1024),
    "4M": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                      num_kv_heads=4, max_position_embeddings=512),
}


def decode_rate(model, prompt, tokens: int, repeats: int) -> float:
    def run(n):
        start = time.perf_counter()
        generate(model, [prompt], SamplingConfig(max_new_tokens=n))
        return time.perf_counter() - start

    run(tokens)  # warm-up
    times = [run(tokens) - run(1) for _ in range(repeats)]
    return (tokens - 1) / statistics.median(times)


def linear_bytes(model, names) -> int:
    return sum(t.numel() * t.element_size() for n in names
               for key, t in model.get_submodule(n).state_dict().items() if key != "bias")


def variants(base: Transformer, names: list[str]):
    yield "fp32", base
    yield "bf16 weights", copy.deepcopy(base).to(torch.bfloat16)
    for label, method, bits, group in (("rtn int8 (per row)", "rtn", 8, None), ("rtn int4 g64", "rtn", 4, 64)):
        model = copy.deepcopy(base)
        linear.quantize_model(model, method, bits, group)
        yield label, model
    model = copy.deepcopy(base)  # GPTQ's stored format: any Hessian gives the same layout and the same speed
    hessians = {n: gptq.hessian(torch.randn(256, base.get_submodule(n).in_features)) for n in names}
    linear.quantize_model(model, "gptq", 4, 64, hessians=hessians, act_order=True)
    yield "gptq int4 g64 act-order", model
    model = copy.deepcopy(base)
    bnb.to_4bit(model, bnb.QLoRAConfig("nf4", True))
    yield "bitsandbytes nf4", model
    model = copy.deepcopy(base)
    bnb.to_int8(model)
    yield "bitsandbytes LLM.int8()", model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="13M")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = Transformer(SIZES[args.size]).eval()
    names = list(linear.linears(base))
    reference = linear_bytes(base, names)
    prompt = list(range(1, 17))
    rows = []
    with torch.no_grad():
        for label, model in variants(base, names):
            rate = decode_rate(model, prompt, args.tokens, args.repeats)
            rows.append((label, linear_bytes(model, names) / reference, rate))
    fp32 = rows[0][2]
    print(f"| {args.size} model, batch 1, {args.tokens} new tokens, {torch.get_num_threads()} threads | "
          "linear-layer bytes vs fp32 | decode tokens/s | vs fp32 |")
    print("|---|---|---|---|")
    for label, size, rate in rows:
        print(f"| {label} | {size:.3f} | {rate:.0f} | {rate / fp32:.2f}× |")


if __name__ == "__main__":
    main()
