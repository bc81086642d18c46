"""Resource accounting (CS336 lecture 2 as a tool): parameters, FLOPs, memory, time and scaling.

`arch.py` reads a Hugging Face config.json into one normalized `Arch`; `formulas.py` (parameters, FLOPs,
time, scaling) and `memory.py` are the arithmetic, each number returned as a `Line` with its formula and
source; `verify.py` checks the arithmetic against transformers' own models and torch's FLOP counter on the meta
device. Everything but `verify.py` is pure
Python, so `mmctl account` answers in well under a second without torch.

Leaves out: tensor/pipeline/expert parallelism, optimizer choices other than AdamW, communication time, and
allocator fragmentation (real peaks run a few percent above the sum of parts).
"""

from __future__ import annotations

from mmctl.accounting.arch import Arch, from_hf_config
from mmctl.accounting.formulas import Line, Workload

__all__ = ["Arch", "Line", "Workload", "from_hf_config", "account", "nest"]

SECTIONS = ("Parameters", "FLOPs", "Training time", "Inference memory", "Training memory", "Scaling")


def account(a: Arch, w: Workload, gpu: str, gpu_spec: dict, mfu: float) -> dict[str, list[Line]]:
    """Every number of the report, by section."""
    from mmctl.accounting import formulas as f
    from mmctl.accounting import memory

    p = f.params(a)
    total = int(next(x.value for x in p if x.key == "params.total"))
    tokens = w.tokens if w.tokens is not None else 20.0 * total
    flops = f.flops(a, w, tokens)
    train_total = next(x.value for x in flops if x.key == "flops.train_total")
    dtype = {"fp32": "fp32", "fp16-mixed": "fp16"}.get(w.precision, "bf16")
    return {
        "Parameters": p,
        "FLOPs": flops,
        "Training time": f.timing(train_total, gpu_spec["peak_flops"][dtype], w.num_gpus, mfu, gpu, dtype),
        "Inference memory": memory.inference_memory(a, w, total),
        "Training memory": memory.training_memory(a, w, total),
        "Scaling": f.scaling(total, tokens),
    }


def nest(lines: list[Line]) -> dict:
    """Lines → nested dict by their dotted keys (`params.total` → {"params": {"total": …}})."""
    out: dict = {}
    for line in lines:
        node = out
        *parents, leaf = line.key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        value = line.value
        node[leaf] = int(value) if line.unit == "params" or (line.unit == "bytes" and float(value).is_integer()) \
            else value
    return out


def fit(a: Arch, w: Workload, gpu_spec: dict) -> dict:
    """Whether training fits in one GPU's memory, and if not the first of the usual remedies that does — activation
    checkpointing, ZeRO-3 over the GPUs there are, both, then more GPUs (to 4,096) — as the settings to change:
    {"fits", "peak_bytes", "gpu_bytes", "with": {setting: value} | None, "peak_with": bytes | None}."""
    from dataclasses import replace

    from mmctl.accounting import formulas as f
    from mmctl.accounting import memory

    total = int(next(x.value for x in f.params(a) if x.key == "params.total"))

    def peak(work: Workload) -> float:
        return next(x.value for x in memory.training_memory(a, work, total) if x.key == "memory.training.peak")

    have, need = gpu_spec["memory_gb"] * 1e9, peak(w)
    out = {"fits": need <= have, "peak_bytes": need, "gpu_bytes": have, "with": None, "peak_with": None}
    if out["fits"]:
        return out
    tries = [{"activation_checkpointing": "full"}]
    tries += [{"zero": 3}, {"zero": 3, "activation_checkpointing": "full"}] if w.num_gpus > 1 else []
    tries += [{"zero": 3, "activation_checkpointing": "full", "num_gpus": n} for n in (8, 16, 32, 64, 128, 256, 512,
                                                                                       1024, 2048, 4096)
              if n > w.num_gpus]
    for change in tries:
        p = peak(replace(w, **change))
        if p <= have:
            out.update({"with": change, "peak_with": p})
            break
    return out
