"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath; R1's RL) as a loss on token log-probabilities.

For each prompt, sample a group of G completions o_1..o_G from the policy, score each with verifiable rewards
r_i, and use the group as its own baseline — no value model:

    advantage  A_i = r_i − mean(r)                 (scale_rewards: ÷ (std(r) + 1e-4); Dr. GRPO drops this)
    ratio      ρ_t = π(o_t | …) / π_old(o_t | …)   (π_old: the policy that sampled the group)
    per token  ℓ_t = −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A)  [+ β · KL_t to the reference]
    KL_t (k3)  = exp(q) − q − 1 with q = log π_ref − log π   (unbiased, always ≥ 0), times ρ_t by default: the
               tokens were sampled from π_old, and the weight makes the KL's gradient the unbiased reverse-KL
               gradient (DeepSeek-V3.2; TRL's default; the GRPO paper and CS336 use plain k3: kl_bias_correction
               false). The ratio is differentiable, so this changes the gradient even at μ = 1.

and the ℓ_t are summed over the batch by `loss_type`:
    grpo     each sequence's mean over its tokens, then the mean over sequences (the paper's; long completions'
             tokens count less)
    dr_grpo  Σ ℓ_t / (sequences × max_completion_tokens): a constant normaliser (Liu et al. 2025, Dr. GRPO)
    dapo     Σ ℓ_t / tokens in the batch: every token counts the same (Yu et al. 2025, DAPO; TRL's default)

With num_iterations μ = 1 the policy that sampled is the one being trained, so ρ = 1, nothing clips, and the
loss's *value* is −mean(A)·1 = 0 for every group whatever the model learns (advantages sum to zero in a group):
a GRPO loss near 0 is normal, its gradient −A ∇log π is not. Watch the rewards instead. With μ > 1 the group is
reused for μ steps and the ratio moves away from 1; clipping then bounds each step.

Leaves out: sequence-level importance sampling (GSPO), entropy bonuses, the other losses TRL has (cispo, sapo, …).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mmctl.recipe import option
from mmctl.rl.rewards import RewardSpec


@dataclass
class GRPOConfig:
    group_size: int = option(8, "G: completions sampled per prompt (their mean reward is each one's baseline)",
                             ge=2, le=1024)
    max_completion_tokens: int = option(16, "tokens of a completion at most", ge=1, le=65536)
    temperature: float = option(1.0, "sampling temperature of the completions", ge=0.01, le=100)
    top_p: float = option(1.0, "nucleus sampling of the completions (1: off)", ge=0.001, le=1)
    rewards: list[RewardSpec] = option([RewardSpec("numeric")], "the rewards, summed with their weights "
                                       "(fields: name, weight; mmctl/rl/rewards.py)")
    allow_python_rewards: bool = option(False, "allow a module:function reward (it runs your Python code)")
    reward_seconds: float = option(10.0, "the longest one call of a module:function reward may take (seconds)",
                                   gt=0, le=3600)
    scale_rewards: bool = option(True, "divide each advantage by its group's reward std (false: Dr. GRPO)")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = option(
        "dapo", "how per-token losses sum: grpo (per-sequence mean) | dr_grpo (constant normaliser) | dapo "
                "(per token over the batch)")
    epsilon_low: float = option(0.2, "clip the ratio below at 1 − epsilon_low", ge=0, lt=1)
    epsilon_high: float = option(0.2, "clip the ratio above at 1 + epsilon_high (DAPO: 0.28)", ge=0, le=10)
    num_iterations: int = option(1, "μ: optimizer steps on each batch of completions (their old log-probs are "
                                    "kept from when they were sampled)", ge=1, le=64)
    beta: float = option(0.0, "weight of the KL penalty to the starting model (0: none, and no reference kept)",
                         ge=0)
    kl_bias_correction: bool = option(True, "weight the KL term by the importance ratio π / π_old (the unbiased "
                                            "reverse-KL gradient; false: the GRPO paper's plain k3)")
    samples_every: int = option(10, "steps between completions written to samples.jsonl", ge=1)


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t) for every position: logits (B, T, V), targets (B, T) → (B, T), in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of each next-token distribution, in nats: (B, T, V) → (B, T), no gradient."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)


def advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages: rewards (N,) in consecutive groups of `group_size` → (N,).

    The std is the unbiased one (n − 1), as TRL and the CS336 reference compute it; 1e-4 keeps a group whose
    rewards are all equal (std 0, advantage 0) finite."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


def loss(cfg: GRPOConfig, logps: torch.Tensor, old_logps: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
         ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, float, dict[str, tuple[torch.Tensor, float]]]:
    """(loss summed over what `loss_type` counts, that count, metrics as (sum, weight)) for one micro-batch.

    logps, old_logps, ref_logps, mask: (B, T) over completion tokens (mask 1 on a completion's tokens); adv (B,).
    The loop divides the summed loss by the count summed over micro-batches and processes, so each aggregation is
    exactly its formula over the whole batch however it is split.
    """
    mask = mask.float()
    ratio = torch.exp(logps - old_logps)
    a = adv.unsqueeze(1)
    per_token = -torch.min(ratio * a, ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high) * a)
    metrics = {}
    tokens = float(mask.sum())
    if ref_logps is not None:
        q = ref_logps - logps
        kl = torch.exp(q) - q - 1
        if cfg.kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = ((kl.detach() * mask).sum(), tokens)
    low = ((ratio < 1 - cfg.epsilon_low) & (a < 0)).float() * mask
    high = ((ratio > 1 + cfg.epsilon_high) & (a > 0)).float() * mask
    metrics.update({"clip_ratio/low": (low.sum(), tokens), "clip_ratio/high": (high.sum(), tokens),
                    "clip_ratio/region": ((low + high).sum(), tokens)})
    masked = per_token * mask
    if cfg.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum(), len(adv), metrics
    if cfg.loss_type == "dr_grpo":
        return masked.sum() / cfg.max_completion_tokens, len(adv), metrics
    return masked.sum(), tokens, metrics


def batch_loss(cfg: GRPOConfig, model, batch: dict):
    """GRPO's loss on one micro-batch, with the clip fractions, KL, entropy and the rollout's statistics."""
    from mmctl.train.loop import LossOut

    logits = model(batch["ids"][:, :-1])
    logps = token_logps(logits, batch["ids"][:, 1:])
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()  # μ = 1: the sampling policy is this one
    total, count, metrics = loss(cfg, logps, old, batch["adv"], batch["mask"], batch.get("ref_logps"))
    metrics["entropy"] = ((token_entropy(logits) * batch["mask"]).sum(), float(batch["mask"].sum()))
    return LossOut(total, count, batch["tokens"], {**metrics, **batch["stats"]})
