"""Independent references for the accounting tests: transformers' own models on the meta device.

Kept apart from mmctl/accounting/verify.py on purpose: the tests must not grade mmctl with mmctl's harness.
"""

from __future__ import annotations

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def hf_model(config: dict):
    config = dict(config)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")


def hf_params(config: dict) -> int:
    """sum(p.numel() for p in model.parameters()): tied tensors once, buffers never."""
    return sum(p.numel() for p in hf_model(config).parameters())


def hf_flops_per_token(config: dict, seq_len: int) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per token counted by FlopCounterMode on meta tensors."""
    model = hf_model(config)
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as fwd:
        model(input_ids=ids)
    with FlopCounterMode(display=False) as train:
        model(input_ids=ids).logits.float().sum().backward()
    return fwd.get_total_flops() / seq_len, train.get_total_flops() / seq_len
