"""Where a run executes: its `run:` section, the device, the precision, the process group and the device's peak.

Every stage's recipe has the same `run:` section (`RunConfig`: out, seed, device), so one Makefile can say
`--set run.device=cuda` to any stage. `pick_device` / `pick_precision` resolve `auto`; `setup_distributed`
joins the process group that `accelerate launch` or torchrun describe in the environment; `peak_flops` measures
the matmul rate that MFU is relative to. torch is imported inside the functions: `mmctl --help` never loads it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

from mmctl.errors import UsageError
from mmctl.recipe import option

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class RunConfig:
    """The `run:` section of every recipe; each stage declares it with its own default `out`
    (`option(RunConfig("out/pretrain"), ...)`)."""

    out: str | None = option(None, "output directory (manifest.json, metrics.jsonl and the stage's product)")
    seed: int = option(0, "seed of everything random in the stage (weights, data order, sampling)", ge=0,
                       lt=2**63)
    device: Literal["auto", "cpu", "cuda", "mps"] = option(
        "auto", "auto: cuda, then mps, then cpu (stages that run no model, tokenize and account, ignore it)")


def pick_device(device: str | None = "auto") -> str:
    """`auto` (or None) → cuda, then mps, then cpu. An explicit device is returned as given."""
    import torch

    if device not in (None, "auto"):
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_precision(precision: str, device: str) -> str:
    """auto: bf16 autocast where it is fast — CUDA with bf16 support, and modern CPUs — else fp32."""
    import torch

    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device == "cpu" else "fp32"


def autocast(precision: str, device: str):
    """bf16 autocast (fp32 master weights) for `precision == "bf16"`, else nothing."""
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


@dataclass
class Dist:
    """Where this process sits in a multi-process run (rank 0 of 1 when alone), and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    fsdp: str | None = None  # under `accelerate launch --use_fsdp`: its sharding strategy (FULL_SHARD, SHARD_GRAD_OP)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """The model is sharded over the processes (FSDP), not replicated (DDP)."""
        return bool(self.fsdp) and self.world > 1

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed

            torch.distributed.barrier()

    def all_reduce(self, values: list, op: str = "sum") -> list[float]:
        """Sum (or max) a few numbers — Python numbers or scalar tensors — over all processes, as floats.
        One transfer to the host for all of them."""
        import torch

        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device).reshape(()) for v in values])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()


NOT_SHARDABLE = ("FSDP (accelerate launch --use_fsdp) shards pretrain and full sft; this stage trains with DDP: "
                 "launch it with --multi_gpu")


def setup_distributed(device: str, shardable: bool = False) -> Dist:
    """Join the process group that `accelerate launch` / torchrun describe in the environment, if any.

    On GPUs each process takes the GPU of its local rank (without this every rank would use cuda:0).
    `shardable`: the stage can train under FSDP (mmctl/train/fsdp.py); one that cannot is refused here, before
    it loads or touches anything.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    fsdp = fsdp_strategy()
    if fsdp and not shardable:
        raise UsageError(NOT_SHARDABLE)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device, fsdp)


# accelerate writes the strategy by name or by its number in torch's ShardingStrategy enum
FSDP_STRATEGIES = {"FULL_SHARD": "FULL_SHARD", "1": "FULL_SHARD", "SHARD_GRAD_OP": "SHARD_GRAD_OP",
                   "2": "SHARD_GRAD_OP"}


def fsdp_strategy() -> str | None:
    """The FSDP sharding strategy `accelerate launch --use_fsdp` asks for (its FSDP_* variables), None without
    FSDP; one line naming the setting for what mmctl's FSDP (mmctl/train/fsdp.py) does not do."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return None
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy not in FSDP_STRATEGIES:
        raise UsageError(f"FSDP sharding strategy {strategy}: mmctl shards with FULL_SHARD (ZeRO-3) or "
                         "SHARD_GRAD_OP (ZeRO-2); for no sharding launch with --multi_gpu (DDP)")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("1", "true"):
        raise UsageError("FSDP CPU offload (--fsdp_offload_params true) is not supported by mmctl")
    return FSDP_STRATEGIES[strategy]


def memory_bytes(device: str) -> int | None:
    """The memory a device has in all: the GPU's, or the machine's RAM for the CPU (None where unknown)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    if device == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def ensure_fits(needed: float, device: str, what: str) -> None:
    """Refuse, before allocating anything, a run whose predicted peak memory exceeds all the device has."""
    total = memory_bytes(device)
    if total is not None and needed > total:
        raise UsageError(f"{what}: needs about {needed / 1e9:,.1f} GB at its peak (mmctl account's estimate), more "
                         f"than the {total / 1e9:,.1f} GB this {device} has; make the model, batch or context smaller")


def peak_flops(device: str, precision: str, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 10) -> float:
    """The device's matmul FLOP/s in this precision, measured now: the denominator of MFU.

    A CPU has no datasheet peak worth quoting (clocks, SIMD width and thread count all vary, and a shared
    machine varies by the second), so the best rate of square matmuls of a few sizes, measured in the same
    process just before training, is what MFU is relative to.
    """
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    cuda = device.startswith("cuda")
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(repeats + 1):  # the first run warms up
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize()
            best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


class TimeLimit(Exception):
    """Raised inside code that ran past its `time_limit`."""


@contextmanager
def time_limit(seconds: float, what: str):
    """Raise TimeLimit in the code run inside once `seconds` have passed — for code mmctl runs but did not write (a
    reward function, a chat template): a SIGALRM timer, so the main thread only (elsewhere no limit), and an outer
    timer is put back with the time it had left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise TimeLimit(f"{what} took more than {seconds:g} s")

    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, expired)
    old_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_left:
            signal.setitimer(signal.ITIMER_REAL, max(old_left - (time.monotonic() - started), 1e-3))


def announce(dist: Dist) -> None:
    """Say where the work runs — device, threads, processes — once, as a stage starts; and warn when a launcher
    asked for more processes than there are (`accelerate launch --num_processes 2` without `--multi_gpu` on a CPU
    starts one), or when the thread count oversubscribes the cores the process may use."""
    import torch

    from mmctl.console import console

    if not dist.main:
        return
    threads, cores = torch.get_num_threads(), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    console.print(f"compute: {dist.device}, {threads} thread{'s' * (threads != 1)} (OMP_NUM_THREADS sets it), "
                  f"{dist.world} process{'es' * (dist.world != 1)}")
    if dist.world == 1 and os.environ.get("MASTER_ADDR"):
        console.print("[yellow]warning:[/yellow] a launcher set MASTER_ADDR for several processes, but this is the "
                      "only one: on a CPU, `accelerate launch --multi_gpu --num_processes N` starts N")
    if dist.device == "cpu" and threads * dist.world > cores:
        console.print(f"[yellow]warning:[/yellow] {threads * dist.world} threads on {cores} cores: on a shared or "
                      "small machine that is slower than fewer (set OMP_NUM_THREADS)")
