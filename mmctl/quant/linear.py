"""Quantized linear layers: a weight stored as integer codes with its scales (and zero points), dequantized to
the input's dtype on every forward — what round-to-nearest and GPTQ produce, in one module.

    int8:   qweight int8 (out, in), scales (out, 1);                     ŵ = q · s           (symmetric, per row)
    b bits: qweight uint8 (out, in · b / 8) (codes packed, `pack`),      ŵ = (q − z) · s     (per group of inputs)
            scales (out, n_groups), zeros uint8 (out, n_groups), g_idx int32 (in,) (each input's group; with
            GPTQ's act-order the groups are not contiguous)

Tensor names follow the module path (`model.layers.0.self_attn.q_proj.qweight`, `.scales`, `.zeros`, `.g_idx`,
`.bias`), so a quantized checkpoint is a safetensors file with its integer tensors in their own dtypes.
Dequantize-then-multiply is exact but not fast on a CPU: every forward rebuilds the float weight (see
benchmarks/quantize.md once it lands).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmctl.errors import DataError


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits (…, n) → bytes (…, n · bits / 8): each run of 8 codes becomes `bits` bytes, code k at
    bit offset k · bits of the run's little-endian integer (4 bits: two codes per byte, the first in the low
    nibble)."""
    if bits == 8:
        return codes.to(torch.uint8)
    n = codes.shape[-1]
    if n % 8:
        raise ValueError(f"packing needs a multiple of 8 codes per row, got {n}")
    runs = codes.to(torch.int64).view(*codes.shape[:-1], n // 8, 8)
    at = codes.device
    word = (runs << (torch.arange(8, device=at) * bits)).sum(-1)  # (…, n / 8) integers of 8 · bits bits
    out = (word.unsqueeze(-1) >> (torch.arange(bits, device=at) * 8)) & 0xFF
    return out.flatten(-2).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes (…, n)."""
    if bits == 8:
        return packed
    if bits == 4:  # the common case, in byte arithmetic: two nibbles per byte, the first in the low one
        return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    runs = packed.to(torch.int64).view(*packed.shape[:-1], -1, bits)
    at = packed.device
    word = (runs << (torch.arange(bits, device=at) * 8)).sum(-1)
    codes = (word.unsqueeze(-1) >> (torch.arange(8, device=at) * bits)) & (2**bits - 1)
    return codes.flatten(-2).to(torch.uint8)


class QuantLinear(nn.Module):
    """A linear layer whose weight is integer codes and scales; `bits` 8 is symmetric per row, 2–4 grouped."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int | None, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scales", torch.ones(out_features, 1))
        else:
            n_groups = in_features // group
            self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8))
            self.register_buffer("scales", torch.ones(out_features, n_groups))
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
            self.register_buffer("g_idx", (torch.arange(in_features) // group).to(torch.int32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group: int | None, bias: torch.Tensor | None = None, g_idx: torch.Tensor | None = None
                   ) -> QuantLinear:
        """From what `rtn` or `gptq` return (codes unpacked, (out, in))."""
        out, n = codes.shape
        layer = cls(n, out, bits, group, bias is not None)
        layer.qweight.copy_(codes if bits == 8 else pack(codes, bits))
        layer.scales.copy_(scales)
        if bits != 8:
            layer.zeros.copy_(zeros.to(torch.uint8))
            if g_idx is not None:
                layer.g_idx.copy_(g_idx)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        """ŵ (out, in) in `dtype`."""
        if self.bits == 8:
            return (self.qweight.float() * self.scales).to(dtype)
        from mmctl.quant.rtn import dequantize_groups

        codes = unpack(self.qweight, self.bits)
        if self._in_order():  # groups of consecutive inputs: a broadcast, no gather
            out, n = codes.shape
            blocks = codes.view(out, -1, self.group).float()
            return ((blocks - self.zeros.float().unsqueeze(-1)) * self.scales.unsqueeze(-1)).view(out, n).to(dtype)
        return dequantize_groups(codes, self.scales, self.zeros.float(), self.g_idx.long()).to(dtype)

    def _in_order(self) -> bool:
        """Whether every input's group is input // group (no act-order permutation); remembered per g_idx."""
        key = (self.g_idx.data_ptr(), self.g_idx.device)
        if getattr(self, "_order_key", None) != key:
            self._order_key = key
            self._order = bool(torch.equal(self.g_idx.long(), torch.arange(self.in_features, device=self.g_idx.device)
                                           // self.group))
        return self._order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group={self.group}"

    def check(self, where: str) -> None:
        """A loaded layer's group indices must name its groups (a crafted file could point anywhere)."""
        if self.bits != 8 and len(self.g_idx) and not 0 <= int(self.g_idx.min()) <= int(self.g_idx.max()) < \
                self.scales.shape[1]:
            raise DataError(f"{where}: g_idx names a group this layer does not have")


# --- a whole model -------------------------------------------------------------------------------------------

SKIP = ("lm_head",)  # kept in floating point by default, as the embeddings (which are not nn.Linear) are


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether module `name` is kept in floating point: `skip` names it, a module above it, or its last part
    (`lm_head`, `down_proj`)."""
    return any(name == s or name.startswith(s + ".") or name.rsplit(".", 1)[-1] == s for s in skip)


def linears(model: nn.Module, skip: tuple[str, ...] = SKIP) -> dict[str, nn.Linear]:
    """The model's dense linear layers by name, except those `skip` names and those whose weight another module
    shares (a tied lm_head is the embedding)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear and not skipped(name, skip)
            and uses.get(id(m.weight), 0) <= 1}


def stored_bits(model: nn.Module, names: list[str]) -> float:
    """Bits stored per weight of the quantized layers `names`, everything but their biases included (codes,
    scales, zero points, group indices; bitsandbytes' block absmax and code tables)."""
    stored = weights = 0
    for name in names:
        layer = model.get_submodule(name)
        stored += sum(t.numel() * t.element_size() * 8 for key, t in layer.state_dict().items() if key != "bias")
        weights += layer.in_features * layer.out_features
    return stored / weights


def replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def swap(model: nn.Module, config: dict) -> None:
    """Replace the linears a checkpoint's `quantization_config` names with empty QuantLinears of their shapes (for
    loading: the tensors are read into them next)."""
    bits, group = int(config["bits"]), config.get("group_size")
    for name, m in linears(model, tuple(config.get("modules_to_not_convert", SKIP))).items():
        replace(model, name, QuantLinear(m.in_features, m.out_features, bits, group, m.bias is not None))


def calibration_hessians(model: nn.Module, batches, skip: tuple[str, ...] = SKIP) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / n (float64) of every linear's inputs X over the calibration `batches` (each a (B, T) id
    tensor, or a (ids, attention_mask) pair whose padding is left out), one forward each."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[torch.Tensor | None] = [None]  # the current batch's real-token mask, flattened

    def hook(name):
        def record(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            if keep[0] is not None:
                x = x[keep[0]]
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + len(x)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears(model, skip).items()]
    try:
        with torch.no_grad():
            for batch in batches:
                ids, mask = batch if isinstance(batch, tuple) else (batch, None)
                keep[0] = None if mask is None else mask.bool().reshape(-1)
                model(ids, attention_mask=mask) if mask is not None else model(ids)
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * sums[name] / counts[name] for name in sums}


def quantize_model(model: nn.Module, method: str, bits: int = 4, group: int | None = 64, *,
                   hessians: dict | None = None, damp: float = 0.01, act_order: bool = False,
                   skip: tuple[str, ...] = SKIP) -> dict:
    """Swap every linear (but `skip`) for a QuantLinear made by `method` — "rtn" (int8 per row when bits is 8,
    else groups) or "gptq" (needs `hessians`) — and return the `quantization_config` describing it."""
    from mmctl.quant import gptq, rtn

    for name, m in linears(model, skip).items():
        w = m.weight.detach().float()
        bias = None if m.bias is None else m.bias.detach().float()
        if method == "rtn" and bits == 8:
            codes, scale = rtn.int8_rows(w)
            layer = QuantLinear.from_codes(codes, scale, None, 8, None, bias)
        elif method == "rtn":
            layer = QuantLinear.from_codes(*rtn.groups(w, bits, group), bits, group, bias)
        elif method == "gptq":
            r = gptq.gptq(w, hessians[name], bits=bits, group=group, damp=damp, act_order=act_order)
            layer = QuantLinear.from_codes(r.codes, r.scale, r.zero, bits, group, bias, r.g_idx)
        else:
            raise ValueError(f"unknown method {method!r}")
        replace(model, name, layer.to(m.weight.device))
    return {"quant_method": "mmctl", "method": method, "bits": bits, "group_size": None if bits == 8 else group,
            "desc_act": act_order, "modules_to_not_convert": list(skip)}
