"""Quantization: weights stored in fewer bits than they were trained in.

`MethodConfig` is one method of a `mmctl quantize` recipe; `quantize(model, method, …)` swaps the model's linear
layers for that method's and returns the `quantization_config` its checkpoint records: round-to-nearest and
GPTQ (mmctl's packed layers, `linear.py`), NF4 and LLM.int8() (bitsandbytes' layers, `bnb.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmctl.recipe import option

BNB = ("nf4", "int8-bnb")  # the methods bitsandbytes does


@dataclass
class MethodConfig:
    method: Literal["rtn", "gptq", "nf4", "int8-bnb"] = option(
        None, "rtn (round-to-nearest) | gptq | nf4 | int8-bnb (the last two: bitsandbytes; bits and group do not "
              "apply)", required=True)
    bits: int = option(4, "bits per weight: 8 (rtn: symmetric per row), or 2, 3, 4 (in groups)", ge=2, le=8)
    group: int = option(64, "inputs per group sharing a scale and zero point (under 8 bits)", ge=8, le=2**20)
    act_order: bool = option(False, "gptq: quantize the most active inputs first (desc_act)")
    damp: float = option(0.01, "gptq: dampening added to the Hessian's diagonal, × its mean", gt=0, lt=1)
    outlier_threshold: float = option(6.0, "int8-bnb: activation columns with a value above this multiply in "
                                           "16-bit (LLM.int8()); 0: every column in int8", ge=0)
    name: str | None = option(None, "the output dir (inside run.out) and row label; default e.g. gptq-4bit-g64")

    def check(self) -> list[tuple[str, str]]:
        from mmctl.artifacts import name_problem

        if self.bits not in (2, 3, 4, 8):
            return [("bits", f"{self.bits}: expected 2, 3, 4 or 8")]
        if self.method == "gptq" and self.bits == 8:
            return [("bits", "gptq quantizes to 2, 3 or 4 bits (8 bits: rtn is within 0.5% already)")]
        problem = name_problem(self.label)
        return [("name", problem)] if problem else []

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        if self.method in BNB:
            return self.method
        return (f"{self.method}-8bit" if self.bits == 8 else f"{self.method}-{self.bits}bit-g{self.group}"
                + ("-act" if self.act_order else ""))


def quantize(model, m: MethodConfig, skip: tuple[str, ...], hessians: dict | None = None) -> dict:
    """Swap `model`'s linears (but `skip`) for method `m`'s, in place; returns its `quantization_config`. GPTQ
    needs the `hessians` of every linear's inputs (linear.calibration_hessians)."""
    if m.method in BNB:
        from mmctl.quant import bnb

        nf4 = bnb.QLoRAConfig("nf4", double_quant=True) if m.method == "nf4" else None
        if nf4:
            bnb.to_4bit(model, nf4, skip)
        else:
            bnb.to_int8(model, m.outlier_threshold, skip)
        return bnb.checkpoint_config(nf4, skip, m.outlier_threshold)
    from mmctl.quant import linear

    return linear.quantize_model(model, m.method, m.bits, m.group, hessians=hessians, damp=m.damp,
                                 act_order=m.act_order, skip=skip)
