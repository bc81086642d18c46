"""Direct Preference Optimization (Rafailov et al. 2023) and two of its variants, as losses on sequence
log-probabilities.

For a prompt x with a preferred completion y_w and a dispreferred y_l, the policy π is pushed to raise
log π(y_w|x) − log π(y_l|x) relative to a frozen reference π_ref (the starting model):

    Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
    sigmoid (DPO):          −log σ(β Δ)
    sigmoid + smoothing ε:  −(1 − ε) log σ(β Δ) − ε log σ(−β Δ)   (conservative DPO: ε of the labels may be flipped)
    ipo (Azar et al. 2023): (Δ̄ − 1 / (2β))², Δ̄ with each log-ratio divided by its completion's length (as TRL)
    + α · NLL(y_w) (RPO, Pang et al. 2024): the chosen completion's mean token negative log-likelihood, added with
      weight `rpo_alpha` — on near-identical pairs ("2+2=4" against "2+2=5") plain DPO lowers the chosen answer's
      likelihood too (Pal et al. 2024, Smaug); this term holds it up. TRL: loss_type ["sigmoid", "sft"],
      loss_weights [1, α].

β · (log π − log π_ref) is the "implicit reward" of a completion; the metrics carry TRL's names so runs compare:
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (chosen reward > rejected), logps/chosen,
logps/rejected. A sequence's log-probability sums over its completion tokens only (the prompt is given).

Leaves out: the other losses TRL has (hinge, robust, apo, …), f-divergences, weighting by length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from mmctl.recipe import option


@dataclass
class DPOConfig:
    beta: float = option(0.1, "β: how far from the reference the policy may move (larger: less far)", gt=0)
    loss: Literal["sigmoid", "ipo"] = option("sigmoid", "sigmoid (DPO; with label_smoothing, conservative DPO) | ipo")
    label_smoothing: float = option(0.0, "sigmoid only: the share ε of preference labels taken as possibly "
                                         "flipped (conservative DPO)", ge=0, lt=0.5)
    rpo_alpha: float = option(0.0, "α: the weight of the chosen completion's mean token NLL added to the loss "
                                   "(RPO; 0: plain DPO)", ge=0, le=100)

    def check(self) -> list[tuple[str, str]]:
        if self.loss == "ipo" and self.label_smoothing:
            return [("label_smoothing", "only the sigmoid loss takes label_smoothing")]
        return []


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t mask · log p(target_t): logits (B, T, V), targets and mask (B, T) → (B,), in fp32."""
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * mask).sum(dim=-1)


def losses(cfg: DPOConfig, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
           ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor | None = None,
           rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (P,) and per-pair metrics {name: (P,)} from summed log-probabilities (P,) each;
    `*_tokens` (the completions' lengths) are needed by ipo only."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if cfg.loss == "sigmoid":
        z = cfg.beta * (chosen_ratio - rejected_ratio)
        loss = -(1 - cfg.label_smoothing) * F.logsigmoid(z) - cfg.label_smoothing * F.logsigmoid(-z)
    else:
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (delta - 1 / (2 * cfg.beta)) ** 2
    reward_chosen, reward_rejected = cfg.beta * chosen_ratio.detach(), cfg.beta * rejected_ratio.detach()
    return loss, {"rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
                  "rewards/margins": reward_chosen - reward_rejected,
                  "rewards/accuracies": (reward_chosen > reward_rejected).float(),
                  "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}


def logps(model, batch: dict) -> torch.Tensor:
    """Each row's summed completion log-probability under `model` (a batch of `rl/pairs.tensors`)."""
    return sequence_logps(model(batch["ids"][:, :-1]), batch["ids"][:, 1:], batch["trained"])


def batch_loss(cfg: DPOConfig, model, batch: dict):
    """DPO's loss summed over the micro-batch's pairs, with TRL's metrics."""
    from mmctl.train.loop import LossOut

    chosen, rejected = logps(model, batch).chunk(2)
    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    chosen_tokens, rejected_tokens = batch["trained"].sum(-1).chunk(2)
    per_pair, metrics = losses(cfg, chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
    n, total = len(chosen), per_pair.sum()
    if cfg.rpo_alpha:  # the micro-batch's chosen tokens' mean NLL, counted once per pair (TRL's "sft" loss)
        nll = -chosen.sum() / chosen_tokens.sum().clamp(min=1)
        total = total + cfg.rpo_alpha * nll * n
        metrics["nll_loss"] = nll.detach().expand(n)
    return LossOut(total, n, batch["real"], {k: (v.sum(), n) for k, v in metrics.items()})
