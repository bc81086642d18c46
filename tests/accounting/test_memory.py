"""Memory arithmetic against the papers' worked examples (Korthikanti et al. 2022, ZeRO) and known sizes."""

import pytest

from mmctl.accounting import memory as m
from mmctl.accounting.arch import from_hf_config
from mmctl.accounting.formulas import Workload, linears
from tests.accounting.test_formulas import CONFIGS, values


def test_activations_reduce_to_korthikanti_for_gpt3_block():
    # GPT-3's block (LayerNorm, MHA, 4d GeLU MLP, dropout, unfused attention, 16-bit activations):
    # Korthikanti et al. 2022, eq. (1): s·b·h·(34 + 5·a·s/h) bytes per layer with no recomputation,
    # eq. (2) s·b·h·34 with selective recomputation, and 2·s·b·h per layer with full recomputation.
    # (LayerNorm keeps one tensor; the fused norm kernels of the paper. MHA, so eager's K/V repeat is a no-op.)
    c = dict(model_type="gpt2", vocab_size=1000, n_positions=256, n_embd=128, n_layer=4, n_head=8)
    arch = from_hf_config(c)
    s, b, h, a, L = 256, 2, 128, 8, 4
    w = Workload(seq_len=s, batch_size=b, precision="bf16-mixed", attention="eager")
    total, _ = m.activation_memory(arch, w)
    assert total == L * s * b * h * (34 + 5 * a * s / h)
    selective, _ = m.activation_memory(arch, Workload(seq_len=s, batch_size=b, attention="eager",
                                                      activation_checkpointing="selective"))
    assert selective == L * s * b * h * 34
    full, _ = m.activation_memory(arch, Workload(seq_len=s, batch_size=b, activation_checkpointing="full"))
    per_layer, _ = m.activation_bytes_per_layer(arch, Workload(seq_len=s, batch_size=b), moe=False)
    assert full == L * 2 * s * b * h + per_layer  # + one layer live while it is recomputed


def test_zero_memory_matches_the_zero_paper():
    # ZeRO (Rajbhandari et al. 2020) Figure 1: Ψ = 7.5B, N_d = 64, mixed precision (K = 12):
    # baseline 120 GB, P_os 31.4 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB per device.
    expected = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in expected.items():
        parts = m.model_state_bytes(7_500_000_000, "bf16-mixed", stage, 64)
        assert sum(parts.values()) / 1e9 == pytest.approx(gb, abs=0.05)


def test_kv_cache_worked_examples():
    llama2 = from_hf_config(dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32))
    assert m.kv_cache_bytes(llama2, 1, 1, 2) == 512 * 1024  # 0.5 MiB per token in bf16
    llama3 = from_hf_config(dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                 num_key_value_heads=8))
    assert m.kv_cache_bytes(llama3, 1, 1, 2) == 128 * 1024  # GQA: 128 KiB per token
    mla = from_hf_config(dict(model_type="deepseek_v3"))  # 61 layers × (512 latent + 64 rope) × 2 bytes
    assert m.kv_cache_bytes(mla, 1, 1, 2) == 61 * 576 * 2
    gemma = from_hf_config(CONFIGS["gemma2"])  # layers 0 and 2 slide over 8 keys, layer 1 sees all 100
    assert m.kv_cache_bytes(gemma, 100, 1, 2) == (8 + 100 + 8) * 2 * 2 * 16 * 2


def test_weight_formats_bits_per_weight():
    arch = from_hf_config(dict(model_type="llama", vocab_size=128, hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=2, num_attention_heads=8))
    lin = sum(x.numel for x in linears(arch))
    total = int(values(arch.extra)["params.total"])
    rest = (total - lin) * 2
    assert (m._weight_bytes(arch, total, "int4") - rest) * 8 / lin == pytest.approx(4.25)
    assert (m._weight_bytes(arch, total, "nf4") - rest) * 8 / lin == pytest.approx(4.5)
    assert (m._weight_bytes(arch, total, "int8") - rest) * 8 / lin == pytest.approx(8 + 32 / 1024, rel=0.05)


@pytest.mark.parametrize("precision, zero, gpus, recompute", [("fp32", 0, 1, "none"), ("bf16-mixed", 3, 8, "full"),
                                                              ("bf16-true", 1, 4, "selective")])
def test_the_peak_never_exceeds_the_sum_of_parts(precision, zero, gpus, recompute):
    from mmctl import presets

    for name in presets.model_names():
        arch = from_hf_config(presets.load_model(name)["config"], name)
        w = Workload(seq_len=1024, batch_size=2, precision=precision, zero=zero, num_gpus=gpus,
                     activation_checkpointing=recompute)
        total = int(values(arch.extra)["params.total"])
        lines = {x.key: x.value for x in m.training_memory(arch, w, total)}
        assert lines["memory.training.peak"] <= lines["memory.training.sum_of_parts"], name
