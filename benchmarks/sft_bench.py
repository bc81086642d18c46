"""A fine-tuning step: full vs LoRA vs QLoRA in mmctl, and mmctl's LoRA / QLoRA vs PEFT on transformers.

    python benchmarks/sft_bench.py           # d 512, 4 layers, batch 8 × 256, fp32 and bf16 autocast; ~5 min

Every variant starts from the same weights (mmctl → HF checkpoint → transformers), takes the same batch and
AdamW over its trainable parameters; a step is forward + backward + clipping + optimizer step, with the loss over
every token (which tokens are trained does not change a step's cost). LoRA: r 16, alpha 32, every attention and
MLP projection, in both libraries; QLoRA: the same on an NF4 base (double quantization) — mmctl's via
mmctl/quant/bnb.py, PEFT's on transformers' BitsAndBytesConfig. Step times: the variants take turns in one
process (warm-up excluded, median of 5), `torch.set_num_threads(2)`. Peak memory: each variant again in a
process of its own, the rise of the peak RSS above the built model over 3 steps (activations, gradients,
optimizer state; the weights themselves are in the baseline). Linux only (/proc/self).
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from mmctl import checkpoints
from mmctl.models import lora
from mmctl.models.transformer import ModelConfig, Transformer
from mmctl.quant import bnb
from mmctl.runtime import autocast

CFG = ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                  num_kv_heads=4, max_position_embeddings=512, tie_embeddings=True)
B, T, REPEATS = 8, 256, 5
VARIANTS = ["mmctl full", "mmctl lora", "peft lora", "mmctl qlora", "peft qlora"]


def build(variant: str, checkpoint: str):
    """(model, logits_of) for one variant, from the checkpoint dir."""
    if variant.startswith("mmctl"):
        model = checkpoints.load_lm(checkpoint)
        if variant.endswith("qlora"):
            bnb.to_4bit(model, bnb.QLoRAConfig())
        if variant.endswith("lora"):
            torch.manual_seed(0)
            lora.apply_lora(model, lora.LoRAConfig(r=16, alpha=32))
        return model.train(), lambda m, ids: m(ids)
    import peft
    import transformers

    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32) if variant.endswith("qlora") else None
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map="cpu",
                                                              quantization_config=quantization)
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=lora.TARGETS))
    return model.train(), lambda m, ids: m(input_ids=ids).logits


def step_fn(model, logits_of, precision: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(precision, "cpu"):
            logits = logits_of(model, ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return step


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory(variant: str, checkpoint: str, precision: str) -> None:
    """In a process of its own: how far the peak RSS rises above the built model over 3 steps, in bytes, on
    stdout. Loading can peak higher than training, so the peak is reset first (Linux: /proc/self/clear_refs)."""
    torch.set_num_threads(2)
    model, logits_of = build(variant, checkpoint)
    step = step_fn(model, logits_of, precision)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    before = status_kib("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps((status_kib("VmHWM") - before) * 1024))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.save(Transformer(CFG), tmp)
        print(f"model: {CFG.num_parameters():,} parameters (d {CFG.hidden_size}, {CFG.num_layers} layers), "
              f"batch {B} × {T}; LoRA r 16 on every projection\n")
        print("| precision | variant | trainable | ms/step | vs mmctl full | weights | gradients + AdamW state | "
              "peak RSS rise |")
        print("|---|---|---|---|---|---|---|---|")
        for precision in ("fp32", "bf16"):
            models = {v: build(v, tmp) for v in VARIANTS}
            steps = {v: step_fn(m, f, precision) for v, (m, f) in models.items()}
            times = {v: [] for v in VARIANTS}
            for v in VARIANTS:
                steps[v]()  # warm-up
            for _ in range(REPEATS):
                for v in VARIANTS:
                    start = time.perf_counter()
                    steps[v]()
                    times[v].append(time.perf_counter() - start)
            full = statistics.median(times["mmctl full"])
            for v in VARIANTS:
                model = models[v][0]
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                grown = subprocess.run([sys.executable, __file__, "--memory", v, tmp, precision], check=True,
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1]
                t = statistics.median(times[v])
                unique = {x.data_ptr(): x for x in model.state_dict().values() if isinstance(x, torch.Tensor)}
                weights = sum(x.numel() * x.element_size() for x in unique.values())  # a tied head counted once
                print(f"| {precision} | {v} | {trainable:,} | {1000 * t:.0f} | {t / full:.2f}× | "
                      f"{weights / 2**20:.1f} MiB | {12 * trainable / 2**20:.1f} MiB | {int(grown) / 2**20:.0f} MiB |",
                      flush=True)
            del models, steps


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory"]:
        memory(*sys.argv[2:5])
    else:
        main()
