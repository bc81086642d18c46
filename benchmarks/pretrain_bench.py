"""One training step: mmctl's Transformer vs transformers' LlamaForCausalLM, same config, batch and precision.

    python benchmarks/pretrain_bench.py          # d 256, 4 layers, 8 heads (GQA 4), T 256, batch 8; ~2 min

Both models get the same weights (mmctl → HF checkpoint → transformers), the same AdamW and the same batch; a
step is forward + backward + clip + optimizer step. The two take turns (warm-up excluded, median of 7), in fp32
and in bf16 autocast, with `torch.set_num_threads(2)`. MFU uses mmctl.accounting's training FLOPs per token over
the best square-matmul rate measured in the same process (mmctl.runtime.peak_flops).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from mmctl.accounting import formulas
from mmctl.accounting.arch import from_hf_config
from mmctl.models import transformer
from mmctl.models.transformer import ModelConfig, Transformer
from mmctl.runtime import autocast, peak_flops

CFG = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                  num_kv_heads=4, max_position_embeddings=512, tie_embeddings=True)
B, T, REPEATS = 8, 256, 7


def step_fn(model, logits_of, precision):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            logits = logits_of(model, ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def main() -> None:
    import transformers

    torch.set_num_threads(2)
    torch.manual_seed(0)
    ours = Transformer(CFG)
    with tempfile.TemporaryDirectory() as tmp:
        transformer.save_checkpoint(ours, tmp)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    ref.train()
    flops_per_token = formulas.train_flops_per_token(from_hf_config(CFG.to_hf()), T)
    print(f"model: {sum(p.numel() for p in ours.parameters()):,} parameters, batch {B} × {T}, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token (training)\n")
    print("| precision | mmctl ms/step | transformers ms/step | mmctl / transformers | mmctl MFU | transformers MFU |")
    print("|---|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        peak = peak_flops("cpu", precision)
        steps = {"mmctl": step_fn(ours, lambda m, x: m(x), precision),
                 "transformers": step_fn(ref, lambda m, x: m(input_ids=x).logits, precision)}
        times = {name: [] for name in steps}
        for step in steps.values():
            step()  # warm-up
        for _ in range(REPEATS):
            for name, step in steps.items():  # interleaved, so machine noise hits both alike
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
        m, r = (statistics.median(times[k]) for k in ("mmctl", "transformers"))
        mfu = {k: flops_per_token * B * T / statistics.median(v) / peak for k, v in times.items()}
        print(f"| {precision} | {m * 1e3:.0f} | {r * 1e3:.0f} | {m / r:.2f}× the time | {100 * mfu['mmctl']:.0f}% | "
              f"{100 * mfu['transformers']:.0f}% |  (peak {peak / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
