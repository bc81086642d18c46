"""--verify reports agreement, and catches a wrong count."""

import dataclasses

from mmctl.accounting import Workload, account
from mmctl.accounting.arch import from_hf_config
from mmctl.accounting.verify import verify

CONFIG = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
GPU = {"peak_flops": {"bf16": 1e15}}


def test_agrees_on_a_right_arch():
    arch = from_hf_config(CONFIG)
    checks = verify(arch, account(arch, Workload(seq_len=16), "x", GPU, 0.4), 16)
    assert [c.ok for c in checks] == [True, True, True]


def test_disagrees_on_a_wrong_arch():
    arch = from_hf_config(CONFIG)
    wrong = dataclasses.replace(arch, intermediate_size=97)  # the config says 96
    checks = verify(wrong, account(wrong, Workload(seq_len=16), "x", GPU, 0.4), 16)
    assert [c.ok for c in checks] == [False, False, False]


def test_moe_flops_are_not_checked():
    arch = from_hf_config({**CONFIG, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2})
    checks = verify(arch, account(arch, Workload(seq_len=16), "x", GPU, 0.4), 16)
    assert checks[0].ok is True and checks[1].ok is None and "MoE" in checks[1].note
