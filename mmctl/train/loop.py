"""The one training loop: pretrain, sft, rl and align-vision all run through `train()`.

Model-agnostic (nanoGPT's train.py, with CS336's resumability): it takes a model, a batch function
`batches(step, micro, rank) -> (inputs, targets)`, and a loss function `loss_fn(model, inputs, targets)`.
Per optimizer step: the learning rate from the closed-form schedule, gradient accumulation over micro-batches
(DDP synchronizes only on the last), bf16 autocast with fp32 master weights when asked, a finiteness check of
the loss and of the gradient norm *before* the optimizer step (a NaN never reaches the weights or a
checkpoint: exit 5), clipping, the step, then logging, evaluation and checkpointing on their schedules.
Ctrl-C / SIGTERM finish the current step, save a checkpoint and exit 75.

Distributed: under `accelerate launch --multi_gpu --num_processes N` (or torchrun) the environment names the
rank and world size; the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU), each rank
draws its own rows of the global batch, all ranks stop at the same step, and only rank 0 writes.
Leaves out: FSDP, tensor parallelism, gradient scaling for fp16.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl.console import Progress, console
from mmctl.errors import Interrupted, NonFiniteError, UsageError
from mmctl.recipe import option
from mmctl.train import checkpoint
from mmctl.train.optim import OptimConfig, lr_at, make_optimizer


@dataclass
class TrainConfig:
    steps: int = option(200, "optimizer steps", ge=1)
    batch_size: int = option(16, "sequences per optimizer step, across all processes and micro-batches", ge=1)
    micro_batch_size: int | None = option(None, "sequences per forward/backward on one process; unset: "
                                                "batch_size / processes (no accumulation)", ge=1)
    seq_len: int = option(256, "tokens per training sequence", ge=1)
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "fp32 | bf16 (autocast, fp32 master weights) | auto: bf16 where the device runs it fast")
    compile: bool = option(False, "torch.compile the model (a 10-20 s compile, faster steps)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass")
    log_every: int = option(10, "steps between metric lines", ge=1)
    eval_every: int = option(100, "steps between validation losses and samples (and at the end)", ge=1)
    checkpoint_every: int = option(100, "steps between resumable checkpoints (and at the end)", ge=1)
    keep_checkpoints: int = option(2, "newest checkpoints kept; older ones are deleted", ge=1)


    def workload(self, world: int = 1, precision: str | None = None) -> dict:
        """This run in `mmctl account`'s terms (its Workload fields): one process's micro-batch, all tokens."""
        precision = precision or self.precision
        return {"seq_len": self.seq_len, "batch_size": micro_batches(self, world)[0],
                "tokens": float(self.steps * self.batch_size * self.seq_len),
                "precision": "fp32" if precision == "fp32" else "bf16-mixed",
                "activation_checkpointing": "full" if self.activation_checkpointing else "none"}

    def check(self) -> list[tuple[str, str]]:
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            return [("micro_batch_size", f"{self.micro_batch_size} does not divide batch_size ({self.batch_size})")]
        return []


@dataclass
class Dist:
    """Where this process sits in a multi-process run (rank 0 of 1 when alone), and its device."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed

            torch.distributed.barrier()


def setup_distributed(device: str) -> Dist:
    """Join the process group that `accelerate launch` / torchrun describe in the environment, if any.

    On GPUs each process takes the GPU of its local rank (without this every rank would use cuda:0).
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
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def micro_batches(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rows per micro-batch on one process, micro-batches per step); raises if the batch does not divide."""
    per_rank, rest = divmod(cfg.batch_size, world)
    if rest:
        raise UsageError(f"train.batch_size: {cfg.batch_size} does not divide over {world} processes")
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise UsageError(f"train.micro_batch_size: {micro} does not divide the {per_rank} sequences per process")
    return micro, per_rank // micro


def autocast(precision: str, device: str):
    import torch

    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag the loop checks between steps (the second one kills)."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        console.print("stopping after this step (saving a checkpoint); press Ctrl-C again to abort")

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def train(model, *, cfg: TrainConfig, optim: OptimConfig, batches: Callable, loss_fn: Callable, out: Path,
          log: Callable[[dict], None], evaluate: Callable[[int], dict] | None = None, fingerprint: dict,
          force_resume: bool = False, precision: str = "fp32", dist: Dist | None = None,
          flops_per_token: float = 0.0, peak_flops: float = 0.0) -> dict:
    """Train `model` for cfg.steps optimizer steps, resuming from the newest checkpoint in `out`; returns the
    last logged metrics.

    `fingerprint` is what a checkpoint must have been trained with to be resumed (model and data identity);
    a mismatch is refused, naming the key, unless `force_resume` (`resumable()` checks it up front).
    """
    import torch

    dist = dist or Dist()
    device = dist.device
    ckpt_dir = Path(out) / "checkpoints"
    optimizer = make_optimizer(model, optim)
    path = resumable(ckpt_dir, fingerprint, force_resume)
    start, last = 0, {}
    if path is not None:
        state = checkpoint.load(path, model, optimizer)
        start, last = int(state["step"]), state["extra"].get("last", {})
        if dist.main:
            console.print(f"resumed from {path}")
    trained = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[torch.device(device).index] if device.startswith("cuda")
                                          else None)
    if cfg.compile:
        trained = torch.compile(trained)  # checkpoints still save `model`: the compiled wrapper renames nothing
    if cfg.activation_checkpointing:
        inner = getattr(model, "model", None)  # the decoder stack of an mmctl Transformer
        if not hasattr(inner, "activation_checkpointing"):
            raise UsageError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
        inner.activation_checkpointing = True
    micro, accum = micro_batches(cfg, dist.world)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    params = [p for p in model.parameters() if p.requires_grad]
    window_start, window_steps = time.perf_counter(), 0
    with StopRequest() as stop, Progress(cfg.steps, "train") as progress:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg.steps, optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for m in range(accum):
                inputs, targets = batches(step, m, dist.rank)
                sync = trained.no_sync() if dist.world > 1 and m < accum - 1 else nullcontext()
                with sync:
                    with autocast(precision, device):
                        loss = loss_fn(trained, inputs, targets) / accum
                    loss.backward()
                loss_sum += loss.detach().float()
            if dist.world > 1:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= dist.world
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise NonFiniteError(f"step {step + 1}: loss is {loss_value}; stopped before the optimizer step, "
                                     f"the last checkpoint in {ckpt_dir} is intact")
            norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else math.inf)
            if not math.isfinite(norm.item()):
                raise NonFiniteError(f"step {step + 1}: gradient norm is {norm.item()}; stopped before the optimizer "
                                     f"step, the last checkpoint in {ckpt_dir} is intact")
            optimizer.step()
            done = step + 1
            window_steps += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - window_start
                tok_s = tokens_per_step * window_steps / elapsed
                last = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": norm.item(),
                        "tokens": done * tokens_per_step, "tok_s": tok_s,
                        "mfu": flops_per_token * tok_s / peak_flops if peak_flops else None}
                if dist.main:
                    log(last)
                window_start, window_steps = time.perf_counter(), 0
            if evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                result = evaluate(done) if dist.main else {}
                if dist.main:
                    log({"step": done, **result})
                    last.update(result)
            stopping = stop.signal is not None
            if dist.world > 1:  # every rank stops at the same step, or they would deadlock in the next all-reduce
                flag = torch.tensor([float(stopping)], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stopping = bool(flag.item())
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                if dist.main:
                    checkpoint.save(ckpt_dir, done, model, optimizer, {"fingerprint": fingerprint, "last": last})
                    checkpoint.prune(ckpt_dir, cfg.keep_checkpoints)
                dist.barrier()
            if dist.main:
                progress.update(done, loss=loss_value, lr=lr, tok_s=last.get("tok_s", 0.0))
            if stopping:
                raise Interrupted(f"interrupted at step {done}: resumable checkpoint "
                                  f"{checkpoint.step_dir(ckpt_dir, done)}")
    return last


def resumable(ckpt_dir: Path, fingerprint: dict, force: bool) -> Path | None:
    """The newest complete checkpoint to resume from, or None; refuses one written for another model or data."""
    path = checkpoint.latest(ckpt_dir)
    if path is None:
        return None
    saved = checkpoint.read_state(path)["extra"].get("fingerprint", {})
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed and not force:
        raise UsageError(f"{path}: cannot resume: {', '.join(changed)} changed since this checkpoint was written "
                         "(--force-resume to resume anyway, or --fresh to start over)")
    return path
