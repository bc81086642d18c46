"""bitsandbytes' 4-bit linear layers (NF4 and FP4; Dettmers et al. 2023, "QLoRA") and 8-bit ones (LLM.int8();
Dettmers et al. 2022): swap a model's linear layers for them, save and read them as transformers does, and turn
4-bit ones back into ordinary dense layers.

A 4-bit layer stores its weight in blocks of 64 values, each block as 4-bit codes plus one scale (absmax); NF4's
16 codes are the quantiles of a normal distribution, which is how trained weights are spread. Double
quantization stores the scales themselves in 8 bits (about 0.4 bits per parameter saved). The matrix product
dequantizes the weight to the compute dtype and multiplies: the base's bytes never change, and a gradient
still flows to the layer's input, which is all QLoRA needs (the adapters on top are ordinary 32/16-bit tensors).

An 8-bit layer stores each weight row as int8 codes with its absmax scale. Its product quantizes the activations
too, row by row, and multiplies in integers — except the input columns holding a value above the outlier
threshold (6 by default), which multiply in 16-bit: LLM.int8()'s mixed-precision decomposition, which kept
175B-parameter models at full quality where plain int8 activations did not.

bitsandbytes is imported here only, and only when a recipe asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from mmctl.errors import UsageError
from mmctl.recipe import option


@dataclass
class QLoRAConfig:
    quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit code: nf4 (normal-float, QLoRA's) or fp4")
    double_quant: bool = option(True, "store the block scales in 8 bits too (QLoRA's double quantization)")


def require(why: str = "method: qlora"):
    """The bitsandbytes module, or a one-line error saying how to install it and what (`why`) needs it."""
    import logging

    # On import, bitsandbytes warns that an optional fused CPU kernel (the `kernels` package) is missing; mmctl
    # does not use that kernel (see to_4bit), so the warning would only mislead.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError(f"{why} needs bitsandbytes, which is not installed: pip install 'mmctl[quant]' "
                         "(or pip install bitsandbytes)") from None
    finally:
        cpu_ops.setLevel(level)
    # An 8-bit layer logs on every product that float32 inputs are cast to float16 — by design (see above).
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bitsandbytes


def is_4bit(layer: nn.Module) -> bool:
    return hasattr(getattr(layer, "weight", None), "quant_state")


def to_4bit(model: nn.Module, cfg: QLoRAConfig, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear of `model` (but those named in `skip`, and any sharing its weight with another
    module) by a frozen bitsandbytes 4-bit layer, in place; returns their names."""
    from mmctl.quant.linear import linears, replace

    bnb = require()
    swapped = []
    for name, module in linears(model, skip).items():
        weight = module.weight.detach()
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=weight.dtype, compress_statistics=cfg.double_quant,
                                  quant_type=cfg.quant_type, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=cfg.quant_type,
                                         compress_statistics=cfg.double_quant)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        # On CPUs with AVX512-BF16, bitsandbytes repacks the weight for a fused kernel the first time the layer
        # runs in eval mode: that kernel rounds through bf16 (training after an evaluation would then compute
        # differently, and a resumed run would not be bit-exact) and fails unless both dimensions are multiples
        # of 32. The generic path — dequantize, then multiply — is exact and takes any shape.
        layer.support_avx512bf16_for_cpu = False
        replace(model, name, layer.to(weight.device))  # .to() quantizes
        swapped.append(name)
    return swapped


def to_int8(model: nn.Module, threshold: float = 6.0, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear of `model` (but `skip`, and any sharing its weight) by a frozen bitsandbytes 8-bit
    layer (LLM.int8(); activation columns above `threshold` multiply in 16-bit, 0 turns that off), in place;
    returns their names."""
    from mmctl.quant.linear import linears, replace

    bnb = require("method int8-bnb")
    swapped = []
    for name, module in linears(model, skip).items():
        weight = module.weight.detach()
        layer = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                    has_fp16_weights=False, threshold=threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.to("cpu", copy=True), requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        # (its mode matters: in training mode the outlier columns multiply differently)
        replace(model, name, layer.train(module.training).to(weight.device))  # .to() quantizes (from the CPU copy)
        swapped.append(name)
    return swapped


def dequantized(layer: nn.Module):
    """The dense weight a 4-bit layer stands for, in the dtype it was quantized from."""
    bnb = require()
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def to_dense(model: nn.Module) -> nn.Module:
    """Replace every 4-bit layer by an nn.Linear holding its dequantized weight, in place."""
    import torch

    from mmctl.quant.linear import replace

    for name, module in list(model.named_modules()):
        if is_4bit(module) and name:
            weight = dequantized(module)
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=weight.device, dtype=weight.dtype).requires_grad_(False)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            replace(model, name, dense)
    return model


def checkpoint_config(cfg: QLoRAConfig | None, skip: tuple[str, ...], threshold: float = 6.0) -> dict:
    """config.json's `quantization_config` for a model whose linears `to_4bit` (cfg) or `to_int8` (cfg None,
    `threshold`) swapped, as transformers' BitsAndBytesConfig writes it, so `AutoModelForCausalLM.from_pretrained`
    loads the dir (with bitsandbytes)."""
    four = cfg is not None
    return {"quant_method": "bitsandbytes", "load_in_4bit": four, "load_in_8bit": not four, "_load_in_4bit": four,
            "_load_in_8bit": not four, "bnb_4bit_quant_type": cfg.quant_type if four else "fp4",
            "bnb_4bit_use_double_quant": four and cfg.double_quant, "bnb_4bit_compute_dtype": "float32",
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": list(skip), "llm_int8_threshold": threshold,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}


def from_prequantized(model: nn.Module, tensors: dict, names: list[str], dtype, device, config: dict) -> None:
    """Replace the linears `names` of `model` by bitsandbytes layers built from a checkpoint's tensors, popping
    them from `tensors`: for 4 bits the packed codes at `<name>.weight` and the quantization state at
    `<name>.weight.<key>` (absmax, quant_map, …), computing in `dtype`; for 8 bits (`config`'s load_in_8bit) the
    int8 rows at `<name>.weight`, their scales at `<name>.SCB` and `<name>.weight_format` (0: row-major)."""
    from mmctl.quant.linear import replace

    bnb = require("a bitsandbytes checkpoint")
    for name in names:
        module = model.get_submodule(name)
        shape = (module.in_features, module.out_features)
        if config.get("load_in_8bit"):
            codes, scales = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.SCB")
            if int(tensors.pop(f"{name}.weight_format", 0)) != 0:
                raise ValueError(f"{name}.weight_format: only row-major (0) 8-bit weights are read")
            if tuple(codes.shape) != shape[::-1] or tuple(scales.shape) != (shape[1],):
                raise ValueError(f"{name}: int8 weight {tuple(codes.shape)} and SCB {tuple(scales.shape)}, config.json "
                                 f"implies {shape[::-1]} and ({shape[1]},)")
            layer = bnb.nn.Linear8bitLt(*shape, bias=module.bias is not None, has_fp16_weights=False,
                                        threshold=float(config.get("llm_int8_threshold", 6.0)), device="meta")
            layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes,
                                             SCB=scales.float())
        else:
            prefix = f"{name}.weight."
            stats = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
            layer = bnb.nn.Linear4bit(*shape, bias=module.bias is not None, compute_dtype=dtype, device="meta")
            codes = tensors.pop(f"{name}.weight")
            layer.weight = bnb.nn.Params4bit.from_prequantized(codes, stats, requires_grad=False, device=device)
            _check_4bit(name, layer.weight, codes, shape[::-1])
            layer.support_avx512bf16_for_cpu = False  # the exact dequantize-then-multiply path (see to_4bit)
        if module.bias is not None:
            layer.bias = nn.Parameter(tensors.pop(f"{name}.bias"), requires_grad=False)
        replace(model, name, layer)


def _check_4bit(name: str, weight, codes, shape: tuple[int, int]) -> None:
    """A prequantized 4-bit weight's state agrees with the layer config.json describes (bitsandbytes itself would
    only fail, or silently misread, in the first forward)."""
    import math

    state = weight.quant_state
    n = math.prod(shape)
    if tuple(state.shape) != shape or codes.numel() * 2 != n:
        raise ValueError(f"{name}: 4-bit codes of {codes.numel()} bytes for shape {tuple(state.shape)}; config.json "
                         f"implies {shape} ({n // 2} bytes)")
    blocks = math.ceil(n / state.blocksize)
    absmax = state.state2.absmax if state.nested else state.absmax
    if (state.absmax.numel() != blocks or state.nested and absmax.numel() != math.ceil(blocks / state.state2.blocksize)
            or state.code.numel() != 16):
        raise ValueError(f"{name}: its quantization state (absmax, code) does not match {shape} in blocks of "
                         f"{state.blocksize}")
