"""`mmctl account --verify`: check the arithmetic against transformers and torch's FLOP counter.

Parameters: the family's transformers model is built from the same config.json on the meta device (no memory,
no time) and `sum(p.numel() for p in model.parameters())` is the reference — shared (tied) tensors count once,
buffers not at all. FLOPs: one forward, and one forward + backward, of that meta model under
`torch.utils.flop_counter.FlopCounterMode` with eager attention, whose matmuls the counter sees (on real CPU
tensors the fused SDPA kernel is counted as 0 FLOPs). MoE routing is data-dependent and cannot run on meta
tensors, so MoE FLOPs are not checked. Needs torch and transformers (`pip install 'mmctl[verify]'`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmctl.accounting.arch import Arch
from mmctl.accounting.formulas import Line

FLOP_TOLERANCE = 1e-3  # RoPE's tiny inv_freq ⊗ positions matmul and the router are outside the convention


@dataclass(frozen=True)
class Check:
    name: str
    mmctl: float | None
    reference: float | None
    ok: bool | None  # None: not checked (the note says why)
    note: str = ""


def verify(arch: Arch, sections: dict[str, list[Line]], seq_len: int) -> list[Check]:
    values = {line.key: line.value for lines in sections.values() for line in lines}
    try:
        import torch
        import transformers
    except ImportError as e:
        return [Check("parameters", values["params.total"], None, None,
                      f"skipped: {e.name} is not installed (pip install 'mmctl[verify]')")]
    from torch.utils.flop_counter import FlopCounterMode

    config = dict(arch.extra)
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    hf_config._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    ref_params = sum(p.numel() for p in model.parameters())
    checks = [Check("parameters (total)", values["params.total"], ref_params, values["params.total"] == ref_params,
                    f"transformers {type(model).__name__} on the meta device")]
    if arch.num_experts:
        checks.append(Check("FLOPs", None, None, None, "not checked: MoE routing is data-dependent and cannot "
                                                       "run on the meta device"))
        return checks
    # Sliding-window layers still multiply all T×T scores in eager attention (the window is a mask), so compare
    # at a length inside the window, where both conventions agree.
    T = min(seq_len, arch.sliding_window) if arch.sliding_layers else seq_len
    from mmctl.accounting import formulas

    fwd = formulas.forward_flops_per_token(arch, T)
    ids = torch.zeros(1, T, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
    ref_fwd = counter.get_total_flops() / T
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().sum().backward()
    ref_train = counter.get_total_flops() / T
    note = f"FlopCounterMode, eager attention, T={T}"
    checks += [
        Check(f"forward FLOPs / token (T={T})", fwd, ref_fwd, _close(fwd, ref_fwd), note),
        Check(f"training FLOPs / token (T={T})", 3 * fwd, ref_train, _close(3 * fwd, ref_train), note),
    ]
    del logits
    return checks


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= FLOP_TOLERANCE * max(abs(a), abs(b))
