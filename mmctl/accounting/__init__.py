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
