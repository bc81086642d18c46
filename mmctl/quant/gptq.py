"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a linear layer's weight W (out, in) one input column at a time, and after each column
move its rounding error onto the columns not yet quantized, in the direction that least changes the layer's
outputs on calibration inputs X.

The objective is ‖W X − Ŵ X‖², whose Hessian in each row of W is H = 2 X Xᵀ (in × in, the same for every row).
Quantizing column i with error e_i = w_i − q_i, the best correction to the remaining columns F is
δ_F = −e_i / [H_F⁻¹]_ii · [H_F⁻¹]_{i,F} (Optimal Brain Surgeon). Three observations make it fast and stable:
- every row uses the same column order, so H⁻¹ of the shrinking set F is read off one upper Cholesky factor U of
  H⁻¹ (row i of U, divided by U_ii, is the update of the columns after i; U_ii² is [H_F⁻¹]_ii);
- updates are applied lazily: within a block of columns, exactly; to the columns after the block, once per block,
  as one matrix product (the same numbers, less memory traffic);
- H is dampened (λ = `damp` × mean diag H added to the diagonal) so the inverse exists and is well conditioned.
`act_order` quantizes the columns with the largest diag H (the most active inputs) first; with groups, each
input's group is then recorded in `g_idx`. Group scales are computed from the weights as updated so far, when
the group's first column is reached (GPTQ's "dynamic" groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmctl.quant import rtn


@dataclass
class GPTQResult:
    codes: torch.Tensor  # uint8 (out, in), in the original column order
    scale: torch.Tensor  # (out, n_groups)
    zero: torch.Tensor  # (out, n_groups)
    g_idx: torch.Tensor | None  # (in,) each input's group with act_order, else None (groups in order)

    def weight(self) -> torch.Tensor:
        return rtn.dequantize_groups(self.codes, self.scale, self.zero, self.g_idx)


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X Xᵀ / n for calibration inputs (n, in) (rows: tokens)."""
    x = inputs.double().reshape(-1, inputs.shape[-1])
    return (2 / len(x)) * x.T @ x


def prepare(w: torch.Tensor, h: torch.Tensor, damp: float, act_order: bool):
    """(W float64, U upper Cholesky factor of the dampened H⁻¹, column order): inputs never seen (diag H = 0) get
    weight 0, as in the reference implementation."""
    w, h = w.double().clone(), h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(len(h), device=h.device)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(h), dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return w, u, order


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group: int = 128, damp: float = 0.01,
         act_order: bool = False, block: int = 128) -> GPTQResult:
    """Quantize W (out, in) against Hessian H (in, in) to `bits` in groups of `group` inputs (`group` = in: one
    group per row), with lazy batched updates `block` columns at a time."""
    out, n = w.shape
    if n % group:
        raise ValueError(f"in_features {n} is not a multiple of the group size {group}")
    block = group * max(1, block // group)  # whole groups: a group's scale sees every update before it
    w, u, order = prepare(w, h, damp, act_order)
    codes = torch.zeros(out, n, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        w1, err = w[:, b0:b1].clone(), torch.zeros(out, b1 - b0, dtype=w.dtype, device=w.device)
        u1 = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            if (b0 + i) % group == 0:
                scale, zero = rtn.grid(w1[:, i:i + group], bits)
                scales.append(scale)
                zeros.append(zero)
            q = rtn.quantize(w1[:, i:i + 1], scale, zero, bits)
            codes[:, b0 + i] = q.squeeze(1).to(torch.uint8)
            e = (w1[:, i:i + 1] - rtn.dequantize(q, scale, zero)) / u1[i, i]
            w1[:, i:] -= e @ u1[i:i + 1, i:]
            err[:, i:i + 1] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]  # the block's updates to every later column, at once
    scale, zero = torch.cat(scales, dim=1).float(), torch.cat(zeros, dim=1).float()
    inverse = torch.argsort(order)
    g_idx = (torch.arange(n, device=w.device) // group)[inverse].to(torch.int32) if act_order else None
    return GPTQResult(codes[:, inverse], scale, zero, g_idx)
