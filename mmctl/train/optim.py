"""AdamW with decay / no-decay parameter groups, and learning-rate schedules as closed-form functions of the step.

Decay applies to matrices (projections and embeddings) and not to vectors (norm gains, biases), the split of
nanoGPT and most GPT-style training since Loshchilov & Hutter 2019 made decay decoupled. Parameter groups may
scale the schedule's rate (LLaVA trains its projector faster than its LM). Schedules:
- cosine: linear warmup to `lr`, then a half cosine down to `min_lr` at the last step (GPT-3, Chinchilla);
- wsd: warmup, a long stable phase at `lr`, then a linear decay to `min_lr` over the last `decay_fraction` of
  the steps ("warmup-stable-decay", Hu et al. 2024, MiniCPM) — it can be continued from the stable phase;
- constant: warmup, then `lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mmctl.errors import UsageError
from mmctl.recipe import option


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate", gt=0)
    min_lr: float = option(1e-4, "learning rate at the end of the decay", ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "cosine | wsd (warmup-stable-decay) | constant")
    warmup_steps: int = option(50, "steps of linear warmup from 0 to lr", ge=0)
    decay_fraction: float = option(0.2, "wsd: share of the steps spent decaying at the end", gt=0, le=1)
    weight_decay: float = option(0.1, "decoupled weight decay on matrices (not on norms and biases)", ge=0)
    beta1: float = option(0.9, "AdamW first-moment decay", ge=0, lt=1)
    beta2: float = option(0.95, "AdamW second-moment decay", ge=0, lt=1)
    eps: float = option(1e-8, "AdamW denominator epsilon", gt=0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 disables clipping", ge=0)

    def check(self) -> list[tuple[str, str]]:
        return [("min_lr", f"{self.min_lr:g} exceeds lr ({self.lr:g})")] if self.min_lr > self.lr else []


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) in a run of `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start + 1) / decay_steps
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg: OptimConfig, lr_scales: dict[str, float] | None = None):
    """AdamW over the trainable parameters: matrices with weight decay, vectors without, and one group per
    learning-rate scale. `lr_scales` maps a parameter-name prefix (`projector.`) to a multiplier of the schedule's
    rate, stored in each group as `lr_scale`; frozen parameters (requires_grad False) are in no group."""
    import torch

    from mmctl.train.fsdp import is_sharded

    lr_scales = lr_scales or {}
    groups: dict[tuple[float, bool], list] = {}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = max((q for q in lr_scales if name.startswith(q)), key=len, default=None)  # the most specific
        used.add(prefix)
        groups.setdefault((lr_scales.get(prefix, 1.0), p.dim() >= 2), []).append(p)
    if not groups:
        raise UsageError("the model has no trainable parameters")
    unused = sorted(set(lr_scales) - used)
    if unused:
        raise UsageError(f"learning-rate scale for {', '.join(unused)}: no trainable parameter's name starts so")
    param_groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
                    for (scale, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    # fused: one kernel updates every tensor (torch ≥ 2.4 on CPU and CUDA), the same arithmetic as the loop;
    # not for FSDP's sharded parameters (DTensors), which take the per-tensor loop
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and not is_sharded(p)
                for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
