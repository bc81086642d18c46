"""One training step: mmctl's pretrain step vs transformers' LlamaForCausalLM, same config, batch and precision.

    python benchmarks/pretrain_bench.py          # d 256, 4 layers, 8 heads (GQA 4), T 256, batch 8; ~3 min
    python benchmarks/pretrain_bench.py --json results.json

Both models get the same weights (mmctl → HF checkpoint → transformers) and the same batch; a step is forward +
backward + clip + optimizer step. mmctl's step is its pretrain stage's: the head and loss a chunk of rows at a time
(mmctl/train/loss.py) and `make_optimizer`'s fused AdamW, eagerly and with `train.compile` (torch.compile, its
compile time reported apart). transformers' is the usual one: logits, F.cross_entropy, torch's default AdamW.
They take turns (warm-up excluded, median of 7), in fp32 and in bf16 autocast, with `torch.set_num_threads(2)`.
MFU uses mmctl.accounting's training FLOPs per token over the best square-matmul rate measured in the same process
(mmctl.runtime.peak_flops).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmctl-bench-inductor-")  # every compile a first

import torch  # noqa: E402

from mmctl import checkpoints
from mmctl.accounting import formulas  # noqa: E402
from mmctl.accounting.arch import from_hf_config  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from mmctl.runtime import autocast, peak_flops  # noqa: E402
from mmctl.train.loss import token_loss  # noqa: E402
from mmctl.train.optim import OptimConfig, make_optimizer  # noqa: E402

CFG = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                  num_kv_heads=4, max_position_embeddings=512, tie_embeddings=True)
B, T, REPEATS = 8, 256, 7


def batch() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))


def mmctl_step(model, precision, compile=False):
    """mmctl's pretrain step (mmctl/stages/pretrain.py's loss, mmctl/train/optim.py's optimizer)."""
    opt = make_optimizer(model, OptimConfig(lr=1e-4, weight_decay=0.0))
    forward = torch.compile(model) if compile else model
    ids = batch()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            loss = token_loss(forward, ids[:, :-1], ids[:, 1:]) / (B * T)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def hf_step(model, precision):
    """The usual step: every position's logits, F.cross_entropy, torch's default AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = batch()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    flops_per_token = formulas.train_flops_per_token(from_hf_config(CFG.to_hf()), T)
    print(f"model: {sum(p.numel() for p in Transformer(CFG).parameters()):,} parameters, batch {B} × {T}, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token (training), torch {torch.__version__}, "
          f"transformers {transformers.__version__}\n")
    print("| precision | transformers ms/step | mmctl ms/step | mmctl compiled ms/step | compile s | "
          "mmctl / transformers | compiled / transformers | MFU transformers | MFU mmctl | MFU compiled | "
          "matmul peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        models = {"mmctl": Transformer(CFG)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints.save(models["mmctl"], tmp)
            models["compiled"] = checkpoints.load_lm(tmp).train()
            models["transformers"] = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        models["transformers"].train()
        steps = {"transformers": hf_step(models["transformers"], precision),
                 "mmctl": mmctl_step(models["mmctl"], precision),
                 "compiled": mmctl_step(models["compiled"], precision, compile=True)}
        start = time.perf_counter()
        steps["compiled"]()  # compiles the forward and the backward
        compile_s = time.perf_counter() - start
        for step in steps.values():
            step()  # warm-up
        peak = peak_flops("cpu", precision)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(REPEATS):
            for name, step in steps.items():  # interleaved, so machine noise hits all alike
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        mfu = {k: flops_per_token * B * T / (v / 1e3) / peak for k, v in ms.items()}
        rows.append({"precision": precision, "ms": ms, "mfu": mfu, "compile_s": compile_s, "peak_flops": peak})
        hf = ms["transformers"]
        print(f"| {precision} | {hf:.0f} | {ms['mmctl']:.0f} | {ms['compiled']:.0f} | {compile_s:.1f} | "
              f"{ms['mmctl'] / hf:.2f}× | {ms['compiled'] / hf:.2f}× | {mfu['transformers']:.0%} | "
              f"{mfu['mmctl']:.0%} | {mfu['compiled']:.0%} | {peak / 1e9:.0f} GFLOP/s |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"flops_per_token": flops_per_token, "batch": [B, T], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
