"""Next-token cross-entropy through the LM head, a chunk of rows at a time (Liger-Kernel's "fused linear
cross-entropy", written plainly).

The usual loss materialises the logits of every position, (N, V), casts them to float32, keeps the log-softmax
for the backward pass and then builds a gradient of the same size: for a 128k vocabulary and 8k tokens that is
4 GB per copy, the largest tensor of a training step. Here the head runs on `chunk` rows at a time and the
gradient of the loss with respect to those logits, w · (softmax − one-hot), is formed at once and turned straight
into the gradients of the hidden states and of the head's weight; only those are kept for the backward pass,
which merely scales them. The arithmetic is the plain path's (a test holds the two together); measured here it is
also ~25% faster than the plain head + loss (benchmarks/pretrain.md). Leaves out: heads that are not a plain
linear layer (LoRA, quantized) and an FSDP-sharded model, whose head weight is whole only inside its forward —
those take the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmctl.train.fsdp import is_sharded

CHUNK = 1024  # rows of logits alive at once: 1024 × V floats


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives a product of `t` (bf16 under CPU/GPU autocast), so the chunks round as the plain
    head does."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk, grads):
        need_hidden, need_weight = (grads and need for need in ctx.needs_input_grad[:2])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        dtype = _matmul_dtype(hidden)
        w_cast = weight.to(dtype)
        rows = torch.arange(chunk, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t, w = (x[start:start + chunk] for x in (hidden, targets, weights))
            h = h.to(dtype)
            logits = F.linear(h, w_cast).float()  # (n, V)
            lse = logits.logsumexp(-1)
            total += (w * (lse - logits.gather(1, t[:, None])[:, 0])).sum()
            if not (need_hidden or need_weight):  # scoring: the loss alone
                continue
            # d(Σ w·CE)/d logits = w · (softmax − one-hot): formed in place of the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[rows[:len(t)], t] -= 1
            grad = grad.mul_(w[:, None]).to(dtype)
            if need_hidden:
                grad_hidden[start:start + chunk] = grad @ w_cast
            if need_weight:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else (grad_hidden * grad_total).to(ctx.dtypes[0]),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.dtypes[1]), None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """Σ_i weights_i · CE(hidden_i · weightᵀ, targets_i), float32 scalar. hidden (N, C), weight (V, C), targets
    (N,), weights (N,) (None: all ones; 0 leaves a position out). Under no_grad only the loss is computed."""
    weights = torch.ones(targets.shape, device=targets.device) if weights is None else weights.float()
    return _LinearCrossEntropy.apply(hidden, weight, targets, weights, chunk, torch.is_grad_enabled())


def _language_model(model):
    """The Transformer inside DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
               **forward) -> torch.Tensor:
    """Σ weights · cross-entropy of `targets` (B, T) after `inputs` (B, T) — through `linear_cross_entropy` when the
    head is a plain linear layer, else (a LoRA, quantized or FSDP-sharded head) through the model's logits.
    `model` may be wrapped (DDP, compile): the forward runs through the wrapper."""
    head = _language_model(model).lm_head
    flat = None if weights is None else weights.reshape(-1)
    # FSDP gathers a sharded head's weight only inside the model's forward: such a head takes the logits path
    if type(head) is nn.Linear and head.bias is None and not is_sharded(head.weight):
        hidden = model(inputs, logits=False, **forward)
        return linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), head.weight, targets.reshape(-1), flat)
    logits = model(inputs, **forward)
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return per_token.sum() if flat is None else (per_token * flat).sum()
