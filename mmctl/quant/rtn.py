"""Round-to-nearest (RTN) quantization of a weight matrix W (out_features, in_features): each weight becomes the
nearest of 2^bits evenly spaced levels, chosen per output row (int8) or per group of `group` consecutive inputs
of a row (int4, int3). GPTQ (`gptq.py`) uses the same grid and rounding, and changes which weights are rounded
where.

    int8, symmetric per row:     scale = max|w_row| / 127,  q = round(w / scale) ∈ [−127, 127],  ŵ = q · scale
    b bits, asymmetric per group: scale = (max − min) / (2^b − 1),  zero = round(−min / scale) ∈ [0, 2^b − 1],
                                  q = clamp(round(w / scale) + zero, 0, 2^b − 1),  ŵ = (q − zero) · scale

A rounding error is at most half a step (scale / 2) for every weight inside the grid's range, which the range
of each row or group is by construction. The asymmetric grid spends its levels on [min, max] of the group, and
0 stays exactly representable (zero is an integer). Four-bit codes are stored two per byte (`pack4`).
"""

from __future__ import annotations

import torch


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out, 1)): symmetric round-to-nearest per output row."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, codes 0
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the asymmetric `bits`-bit grid spanning each row of `w` (…, n) → shapes (…, 1). The range
    always includes 0 (as GPTQ's reference does), so a zero weight stays zero."""
    maxq = 2**bits - 1
    lo, hi = w.amin(dim=-1, keepdim=True).clamp(max=0), w.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-lo / scale)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `w` on the grid (scale, zero), broadcast."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero) * scale


def groups(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (out, in), scale (out, in / group), zero (out, in / group)): asymmetric round-to-nearest in
    groups of `group` consecutive inputs of each row."""
    out, n = w.shape
    if n % group:
        raise ValueError(f"in_features {n} is not a multiple of the group size {group}")
    blocks = w.float().view(out, n // group, group)
    scale, zero = grid(blocks, bits)
    codes = quantize(blocks, scale, zero, bits)
    return codes.view(out, n).to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """ŵ (out, in) from codes (out, in) and per-group scale / zero (out, n_groups); `g_idx` (in,) names each
    input's group (act-order GPTQ), else inputs go to groups in order."""
    n = codes.shape[1]
    if g_idx is None:
        g_idx = torch.arange(n, device=codes.device) // (n // scale.shape[1])
    return (codes.float() - zero[:, g_idx]) * scale[:, g_idx]
