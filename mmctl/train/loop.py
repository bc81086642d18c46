"""The one training loop: pretrain, sft, rl and align-vision all run through `train()`.

Model-agnostic (nanoGPT's train.py, with CS336's resumability). The contract with a stage:
- `batches(step, rank) -> list[micro_batch]`: called once per optimizer step, returning this process's
  micro-batches for that step (anything the loss function understands). A pure function of (seed, step, rank)
  and, for on-policy RL, of the weights: a resumed run sees exactly the batches the uninterrupted one saw.
- `loss_fn(model, micro_batch) -> LossOut`: the loss *summed* over what it counts (trained tokens, sequences,
  pairs), that count, the real tokens the micro-batch ran through the model, and extra metrics.
The loop backpropagates the sums and divides the gradient once by the count summed over every micro-batch and
process, so 4 accumulated micro-batches of 4 equal one batch of 16 even when each holds a different number of
trained tokens (averaging per-micro-batch means is the gradient-accumulation bug transformers fixed in 4.46).

Per optimizer step: the learning rate from the closed-form schedule (times each parameter group's `lr_scale`),
the micro-batches (DDP synchronizes only on the last), bf16 autocast with fp32 master weights when asked, a
finiteness check of the loss and of the gradient norm *before* the optimizer step (a NaN never reaches the
weights or a checkpoint: exit 5), clipping, the step, then logging, evaluation and checkpointing on their
schedules. Ctrl-C / SIGTERM finish the current step, save a checkpoint and exit 75. Only trainable tensors are
checkpointed; the frozen rest (a LoRA run's base, a VLM's vision tower) is identified by a fingerprint.

Distributed: under `accelerate launch --multi_gpu --num_processes N` (or torchrun) the model is wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPU), each rank draws its own rows of the global batch, all
ranks stop at the same step, and only rank 0 writes. Under `accelerate launch --use_fsdp` the model is sharded
instead (mmctl/train/fsdp.py) for the stages that allow it (`shardable`). Leaves out: tensor parallelism, fp16
loss scaling.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmctl.console import Progress, console
from mmctl.errors import DataError, Interrupted, NonFiniteError, UsageError
from mmctl.recipe import option
from mmctl.runtime import NOT_SHARDABLE, Dist, autocast
from mmctl.train import checkpoint
from mmctl.train.optim import OptimConfig, lr_at, make_optimizer


@dataclass
class TrainConfig:
    steps: int = option(200, "optimizer steps (at most 10^9: published runs take ~10^6)", ge=1, le=10**9)
    epochs: float | None = option(None, "instead of steps: passes over the training rows, steps = ⌈epochs × rows / "
                                        "batch_size⌉ (sft, dpo, align-vision)", gt=0, le=10**6)
    batch_size: int = option(16, "sequences per optimizer step, across all processes and micro-batches", ge=1,
                             le=2**20)
    micro_batch_size: int | None = option(None, "sequences per forward/backward on one process; unset: "
                                                "batch_size / processes (no accumulation)", ge=1, le=2**20)
    seq_len: int = option(256, "tokens per training sequence", ge=1, le=2**20)
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "fp32 | bf16 (autocast, fp32 master weights) | auto: bf16 where the device runs it fast")
    compile: bool = option(False, "torch.compile the model (a 12-21 s compile, faster steps)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass")
    log_every: int = option(10, "steps between metric lines", ge=1)
    eval_every: int = option(100, "steps between validation losses and samples (and at the end)", ge=1)
    checkpoint_every: int = option(100, "steps between resumable checkpoints (and at the end)", ge=1)
    keep_checkpoints: int = option(2, "newest checkpoints kept; older ones are deleted", ge=1)
    loggers: list[Literal["tensorboard", "wandb"]] = option(
        list, "where the metrics also go, beside metrics.jsonl: tensorboard (<out>/tensorboard), wandb (offline "
              "unless logged in; mmctl/train/loggers.py)")

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


def for_rows(cfg: TrainConfig, rows: int) -> TrainConfig:
    """`cfg` with its steps counted from `epochs` over `rows` training rows, when it sets epochs."""
    import dataclasses

    if cfg.epochs is None:
        return cfg
    return dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * rows / cfg.batch_size)))


def micro_batches(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(rows per micro-batch on one process, micro-batches per step); raises if the batch does not divide."""
    per_rank, rest = divmod(cfg.batch_size, world)
    if rest:
        raise UsageError(f"train.batch_size: {cfg.batch_size} does not divide over {world} processes")
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise UsageError(f"train.micro_batch_size: {micro} does not divide the {per_rank} sequences per process")
    return micro, per_rank // micro


@dataclass
class LossOut:
    """What a loss function returns for one micro-batch.

    sum: the loss summed over `count` items (a scalar tensor with a graph).
    count: what it is summed over — trained tokens, sequences or pairs; the step's loss is Σ sum / Σ count.
    tokens: real (non-padding) tokens the micro-batch ran through the model, for tokens/s and MFU.
    metrics: name → (sum, weight), logged as Σ sum / Σ weight over the step (DPO margins, GRPO rewards, …);
        the same names for every micro-batch.
    """

    sum: Any
    count: float
    tokens: int
    metrics: dict[str, tuple[Any, float]] = field(default_factory=dict)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    metrics: dict[str, float]


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


@dataclass
class Parts:
    """What a stage trains and how — the loop's contract (see the module docstring).

    fingerprint: what a checkpoint must have been trained with to be resumed (model and data identity); a
        mismatch is refused, naming the key, unless --force-resume. The frozen tensors' digest is added.
    export: writes the files that make a checkpoint directory loadable (config and tokenizer when it holds the
        whole model, so `mmctl eval out/checkpoints/step-000100` works).
    lr_scales: parameter-name prefix → learning-rate multiplier (a projector faster than its LM).
    flops_per_token: training FLOPs per token, for MFU (0: not reported).
    """

    model: Any
    batches: Callable[[int, int], list]
    loss: Callable[[Any, Any], LossOut]
    evaluate: Callable[[int], dict] | None = None
    export: Callable[[Path], None] | None = None
    fingerprint: dict = field(default_factory=dict)
    lr_scales: dict[str, float] | None = None
    flops_per_token: float = 0.0


@dataclass
class Session:
    """Where and how the loop runs (a stage's Job makes it: mmctl/stages/__init__.py).

    shardable: the stage runs the same forward passes on every process (batches aside), so FSDP may shard the
        model; under FSDP the main process's model ends with its full weights (the others' stay sharded) — its
        forward is still FSDP's, a collective, so it is for saving, not for running alone.
    """

    checkpoints: Path
    log: Callable[[dict], None]
    dist: Dist = field(default_factory=Dist)
    precision: str = "fp32"
    force_resume: bool = False
    shardable: bool = False
    peak_flops: float = 0.0  # the device's measured matmul rate, the denominator of MFU (0: not measured)


def train(parts: Parts, cfg: TrainConfig, optim: OptimConfig, session: Session) -> dict:
    """Train `parts.model` for cfg.steps optimizer steps, resuming from the newest checkpoint in
    `session.checkpoints`; returns the last logged metrics."""
    dist, model, log = session.dist, parts.model, session.log
    if dist.sharded and not session.shardable:
        raise UsageError(NOT_SHARDABLE)
    ckpt_dir = Path(session.checkpoints)
    fingerprint = with_frozen(model, parts.fingerprint)
    trained = _prepare(model, cfg, dist)  # before the optimizer: FSDP replaces the parameters with their shards
    optimizer = make_optimizer(model, optim, parts.lr_scales)
    start, last, seen_tokens = _resume(ckpt_dir, model, optimizer, fingerprint, session.force_resume, dist,
                                       cfg.steps)
    window = Window()
    with StopRequest() as stop, Progress(cfg.steps, "train") as progress:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg.steps, optim)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            result = train_step(trained, model, optimizer, parts.batches(step, dist.rank), parts.loss,
                                optim.grad_clip, session.precision, dist, step)
            done, seen_tokens = step + 1, seen_tokens + result.tokens
            window.add(result.tokens)
            if done % cfg.log_every == 0 or done == cfg.steps:
                tok_s = window.rate()
                mfu = (parts.flops_per_token * tok_s / (session.peak_flops * dist.world)  # per device
                       if session.peak_flops and parts.flops_per_token else None)
                last = {"step": done, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                        "tokens": seen_tokens, "tok_s": tok_s, "mfu": mfu, **result.metrics}
                if dist.main:
                    log(last)
            if parts.evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                last.update(_evaluate(parts.evaluate, done, log, dist))
            stopping = dist.all_reduce([float(stop.signal is not None)], "max")[0] > 0  # all ranks stop together
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping:
                _save(ckpt_dir, done, model, optimizer, cfg, dist, parts.export,
                      {"fingerprint": fingerprint, "last": last, "tokens": seen_tokens})
            if dist.main:
                progress.update(done, loss=result.loss, lr=lr, tok_s=last.get("tok_s", 0.0))
            if stopping:
                raise Interrupted(f"stopped at step {done} (checkpoint saved: {checkpoint.step_dir(ckpt_dir, done)}); "
                                  "run the same command to resume")
    if dist.sharded:
        from mmctl.train import fsdp

        fsdp.gather(model, keep=dist.main)
    return last


def train_step(trained, model, optimizer, micro: list, loss_fn: Callable, grad_clip: float, precision: str,
               dist: Dist, step: int) -> StepResult:
    """One optimizer step over this process's micro-batches: backward the summed losses, divide the gradient by
    the global count, check, clip, step."""
    import torch

    from mmctl.train.fsdp import full

    if not micro:
        raise UsageError(f"step {step + 1}: batches() returned no micro-batches")
    optimizer.zero_grad(set_to_none=True)
    sums: list = [0.0, 0.0, 0]  # loss, count, tokens — kept on the device: no synchronisation per micro-batch
    names: list[str] | None = None
    for i, micro_batch in enumerate(micro):
        last_micro = i == len(micro) - 1
        if dist.sharded:  # reduce-scatter the gradients only after the last micro-batch, as DDP's no_sync
            model.set_requires_gradient_sync(last_micro)
        with trained.no_sync() if dist.world > 1 and not dist.sharded and not last_micro else nullcontext():
            with autocast(precision, dist.device):
                out = loss_fn(trained, micro_batch)
            out.sum.backward()
        if names is None:
            names = sorted(out.metrics)
            sums += [0.0] * (2 * len(names))
        if sorted(out.metrics) != names:  # every rank sums the same list, or the all-reduce would not line up
            raise UsageError(f"the loss function's metrics changed between micro-batches ({names} → "
                             f"{sorted(out.metrics)})")
        values = [out.sum.detach(), out.count, out.tokens] + [x for n in names for x in out.metrics[n]]
        sums = [a + (b.detach() if hasattr(b, "detach") else b) for a, b in zip(sums, values, strict=True)]
    totals = dist.all_reduce(sums)
    loss_sum, count, tokens, pairs = totals[0], totals[1], int(totals[2]), totals[3:]
    if count <= 0:
        raise DataError(f"step {step + 1}: the batch has nothing to train on (no tokens or sequences counted by "
                        "the loss); check the data's masks")
    loss = loss_sum / count
    if not math.isfinite(loss):
        raise NonFiniteError(f"step {step + 1}: loss is {loss}; stopped before the optimizer step, the last "
                             "checkpoint is intact")
    params = [p for p in model.parameters() if p.requires_grad]
    scale = dist.world / count  # DDP / FSDP averaged the gradients over the processes; we want Σ / global count
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    norm = full(norm).item()  # FSDP: a sharded norm
    if not math.isfinite(norm):
        raise NonFiniteError(f"step {step + 1}: gradient norm is {norm}; stopped before the optimizer step, the "
                             "last checkpoint is intact")
    optimizer.step()
    means = {n: pairs[2 * i] / pairs[2 * i + 1] for i, n in enumerate(names) if pairs[2 * i + 1]}
    return StepResult(loss, norm, tokens, means)


class Window:
    """Tokens per second since the last logged line."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate


def with_frozen(model, fingerprint: dict) -> dict:
    """The run's fingerprint with the digest of the tensors it does not train (if any)."""
    return {**fingerprint, **frozen_fingerprint(model)}


def frozen_fingerprint(model) -> dict:
    """{"frozen": digest} of every tensor the run does not train (empty when all are trained).

    Hashing a multi-GB base at every start would cost seconds to minutes, so the digest covers each tensor's
    name, shape, dtype and a strided sample of its values: enough to tell one base model from another.
    """
    import hashlib

    import torch

    frozen = {name: t for name, t in model.state_dict(keep_vars=True).items()
              if not (isinstance(t, torch.nn.Parameter) and t.requires_grad)}
    if not frozen:
        return {}
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(frozen.items()):
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float64)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{sample.sum().item()!r}|{sample.abs().sum().item()!r}"
                     .encode())
    return {"frozen": h.hexdigest()}


def _prepare(model, cfg: TrainConfig, dist: Dist):
    """The module the steps run: activation checkpointing switched on (the model owns how), DDP or FSDP, compile."""
    import torch

    if cfg.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise UsageError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable()
    trained = model
    if dist.sharded:
        from mmctl.train import fsdp

        fsdp.shard(model, dist.fsdp)  # in place: the model is its own wrapper
    elif dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        cuda = dist.device.startswith("cuda")
        trained = DistributedDataParallel(model, device_ids=[torch.device(dist.device).index] if cuda else None)
    if cfg.compile:
        trained = torch.compile(trained)  # checkpoints still save `model`: the compiled wrapper renames nothing
    return trained


def _resume(ckpt_dir: Path, model, optimizer, fingerprint: dict, force: bool, dist: Dist,
            steps: int) -> tuple[int, dict, int]:
    """(first step, last metrics, tokens seen) from the newest checkpoint, or a fresh start. A checkpoint past
    `steps` is refused: resuming it would hand back a longer run's model as this one's."""
    path = resumable(ckpt_dir, fingerprint, force)
    if path is None:
        return 0, {}, 0
    if int(path.name.split("-")[1]) > steps:
        raise UsageError(f"{ckpt_dir}: its newest checkpoint ({path.name}) is past train.steps {steps}: --fresh "
                         "starts over, or raise train.steps to train on from it")
    state = checkpoint.load(path, model, optimizer)
    if dist.main:
        console.print(f"resumed from {path}")
    extra = state["extra"]
    last = extra.get("last", {})
    return int(state["step"]), last, int(extra.get("tokens", last.get("tokens", 0)))


def _evaluate(evaluate: Callable[[int], dict], done: int, log: Callable[[dict], None], dist: Dist) -> dict:
    """Rank 0 evaluates and logs; the others wait at the next collective (under FSDP they evaluate too: each
    forward gathers weights from every process)."""
    if not dist.main and not dist.sharded:
        return {}
    result = evaluate(done)
    if not dist.main:
        return {}
    log({"step": done, **result})
    return result


def _save(ckpt_dir: Path, done: int, model, optimizer, cfg: TrainConfig, dist: Dist, export, extra: dict) -> None:
    # under FSDP every process takes part in gathering each tensor; the main one keeps and saves them
    snap = checkpoint.snapshot(model, optimizer, keep=dist.main) if dist.sharded else None
    if dist.main:
        checkpoint.save(ckpt_dir, done, model, optimizer, extra, export=export, snap=snap)
        checkpoint.prune(ckpt_dir, cfg.keep_checkpoints, upto=done)
    dist.barrier()


def resumable(ckpt_dir: Path, fingerprint: dict, force: bool) -> Path | None:
    """The newest checkpoint that can be resumed, or None if there is none.

    A corrupt, truncated or tampered checkpoint (`checkpoint.problem`) is skipped with a warning for the one
    before it; if none is left, the run is refused rather than silently started over. One written for another
    model or data is refused, naming what changed.
    """
    candidates = checkpoint.complete(ckpt_dir)
    for path in candidates:
        problem = checkpoint.problem(path)
        if problem is not None:
            console.print(f"[yellow]warning:[/yellow] cannot resume from {path.name}: {problem}")
            continue
        saved = checkpoint.read_state(path).get("extra", {}).get("fingerprint", {})
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if changed and not force:
            raise UsageError(f"{path}: cannot resume: {', '.join(changed)} changed since this checkpoint was "
                             "written (--force-resume to resume anyway, or --fresh to start over)")
        return path
    if candidates:
        raise DataError(f"{ckpt_dir}: no checkpoint here can be resumed (see the warnings); --fresh starts over")
    return None
