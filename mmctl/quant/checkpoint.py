"""What a quantized checkpoint dir holds, and how the loader reads it: mmctl's own format (QuantLinear codes,
scales, zero points, g_idx; `quantization_config.quant_method: mmctl`) and bitsandbytes' 4-bit and 8-bit
serializations as transformers writes them. `mmctl/checkpoints.py`'s `load_lm` calls these in
order: `read_config`, `layout` (on the meta model), `attach` (before the state dict loads), `check` (after)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmctl.errors import DataError


def read_config(path: Path) -> dict | None:
    """config.json's `quantization_config` when mmctl wrote it (codes, scales, zero points as safetensors), checked;
    bitsandbytes' 4-bit or 8-bit serialization; None for a dense checkpoint. Other methods' (AWQ, …) are
    transformers'."""
    from mmctl import hf

    where = path / "config.json"
    config = hf.read_json(where).get("quantization_config")
    if config is None:
        return None
    if isinstance(config, dict) and config.get("quant_method") == "bitsandbytes" and (
            config.get("load_in_4bit") or config.get("load_in_8bit")):
        skip = config.get("llm_int8_skip_modules") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise DataError(f"{where}: quantization_config.llm_int8_skip_modules must be a list of module names")
        threshold = config.get("llm_int8_threshold", 6.0)
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise DataError(f"{where}: quantization_config.llm_int8_threshold must be a number ≥ 0")
        return config  # bitsandbytes' serialization (NF4 / FP4 / LLM.int8()), as transformers writes it
    if not isinstance(config, dict) or config.get("quant_method") != "mmctl":
        method = config.get("quant_method") if isinstance(config, dict) else config
        raise DataError(f"{where}: quantization_config {method!r} is not one mmctl reads (its own, or "
                        "bitsandbytes 4-bit or 8-bit); load this checkpoint with transformers")
    bits, group = config.get("bits"), config.get("group_size")
    if bits not in (2, 3, 4, 8) or (bits != 8 and (not isinstance(group, int) or isinstance(group, bool)
                                                   or not 1 <= group <= 2**20)):
        raise DataError(f"{where}: quantization_config needs bits 2, 3, 4 or 8 and, under 8 bits, a group_size "
                        "(1 to 2^20)")
    if config.get("method") not in ("rtn", "gptq") or not isinstance(config.get("desc_act", False), bool):
        raise DataError(f"{where}: quantization_config.method must be rtn or gptq and desc_act true or false")
    skip = config.get("modules_to_not_convert", ["lm_head"])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise DataError(f"{where}: quantization_config.modules_to_not_convert must be a list of module names")
    return config


@dataclass
class Layout:
    """How a quantized checkpoint's tensors differ from the dense model's."""

    config: dict = field(default_factory=dict)  # the quantization_config
    bnb_linears: list[str] = field(default_factory=list)  # linears bitsandbytes' layers replace after reading
    replaced: set[str] = field(default_factory=set)  # dense tensor names the file does not hold
    stored: dict[str, tuple] = field(default_factory=dict)  # the names and shapes it holds instead
    integers: dict[str, torch.dtype] = field(default_factory=dict)  # integer tensors and their dtypes
    free: set[str] = field(default_factory=set)  # tensors whose dtypes are bitsandbytes' to check


def layout(model, config: dict, stored: dict[str, tuple]) -> Layout:
    """Swap mmctl's quantized layers into the (meta) model, or describe what bitsandbytes' layers will read."""
    from mmctl.quant.linear import linears, swap

    if config["quant_method"] == "mmctl":
        swap(model, config)
        return Layout()
    out = Layout(config, bnb_linears=list(linears(model, tuple(config.get("llm_int8_skip_modules") or ["lm_head"]))))
    eight = bool(config.get("load_in_8bit"))
    for name in out.bnb_linears:
        codes = f"{name}.weight"
        extra = (f"{name}.SCB", f"{name}.weight_format") if eight else ()  # 8-bit: row scales, layout flag
        state = {k: s for k, s in stored.items() if k == codes or k.startswith(codes + ".") or k in extra}
        out.replaced.add(codes)
        out.stored |= state
        out.integers[codes] = torch.int8 if eight else torch.uint8  # the codes (4-bit: two per byte)
        out.free |= set(state) - {codes}
    return out


def attach(model, layout: Layout, tensors: dict, dtype, device, path: Path) -> None:
    """bitsandbytes' layers built from their tensors (popped from `tensors`)."""
    if not layout.bnb_linears:
        return
    from mmctl.quant import bnb

    try:
        bnb.from_prequantized(model, tensors, layout.bnb_linears, dtype, device, layout.config)
    except (KeyError, ValueError, RuntimeError) as e:
        raise DataError(f"{path}: a bitsandbytes layer's quantization state is incomplete or malformed ({e})") from None


def check(model, path: Path) -> None:
    """Every loaded QuantLinear's group indices name its groups."""
    from mmctl.quant.linear import QuantLinear

    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.check(f"{path}: {name}")
