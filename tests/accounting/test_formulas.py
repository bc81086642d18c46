"""The accounting arithmetic against transformers (parameters), FlopCounterMode (FLOPs) and worked examples
from the papers (Korthikanti et al. 2022, ZeRO, Chinchilla)."""

import math

import pytest

from mmctl.accounting import formulas as f
from mmctl.accounting.arch import from_hf_config
from mmctl.accounting.formulas import Workload

# Small configs, one or more per family, each exercising a quirk: GQA, MQA, tied/untied heads, explicit
# head_dim ≠ hidden/heads, qkv biases, QK-norm, four norms per layer, MoE (routed + shared, dense-first
# layers), MLA with and without a low-rank q, GPT-2's learned positions and biased Conv1D layers.
CONFIGS = {
    "llama-gqa-untied": dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=160,
                             num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                             tie_word_embeddings=False),
    "llama-mqa-tied-headdim": dict(model_type="llama", vocab_size=256, hidden_size=96, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                   tie_word_embeddings=True),
    "llama-biases": dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, attention_bias=True, mlp_bias=True),
    "mistral": dict(model_type="mistral", vocab_size=300, hidden_size=64, intermediate_size=192,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=16),
    "mixtral": dict(model_type="mixtral", vocab_size=300, hidden_size=64, intermediate_size=96,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2-tied": dict(model_type="qwen2", vocab_size=500, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", vocab_size=256, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8),
    "phi3": dict(model_type="phi3", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=0, bos_token_id=0),
    "olmo2": dict(model_type="olmo2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=400, hidden_size=64, intermediate_size=128,
                        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        n_group=2, topk_group=1),
    "deepseek_v3-no-q-lora": dict(model_type="deepseek_v3", vocab_size=400, hidden_size=64, intermediate_size=128,
                                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
                                  num_experts_per_tok=2, first_k_dense_replace=0, q_lora_rank=None,
                                  kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
                                  n_group=1, topk_group=1, attention_bias=True),
    "gpt2": dict(model_type="gpt2", vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=4),
    "gpt2-n_inner": dict(model_type="gpt2", vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                         n_inner=80, tie_word_embeddings=False),
}
DENSE = [name for name, c in CONFIGS.items() if c["model_type"] not in ("mixtral", "deepseek_v3")]


def values(config: dict, **workload) -> dict:
    from mmctl.accounting import account

    arch = from_hf_config(config, "test")
    sections = account(arch, Workload(**workload), "h100-sxm", {"peak_flops": {"bf16": 1e15, "fp32": 1e14}}, 0.5)
    return {line.key: line.value for lines in sections.values() for line in lines}


@pytest.mark.parametrize("name", CONFIGS)
def test_params_equal_transformers_on_meta(name):
    from tests.reference import hf_params

    assert values(CONFIGS[name])["params.total"] == hf_params(CONFIGS[name])


@pytest.mark.parametrize("name", DENSE)
def test_flops_equal_flop_counter(name):
    from tests.reference import hf_flops_per_token

    T = 8  # inside every sliding window above, where a dense kernel and the window agree
    forward, train = hf_flops_per_token(CONFIGS[name], T)
    v = values(CONFIGS[name], seq_len=T)
    # RoPE's inv_freq ⊗ positions matmul (Dh FLOPs per token) is outside the convention.
    assert v["flops.forward_per_token"] == pytest.approx(forward, rel=2e-3)
    assert v["flops.train_per_token"] == pytest.approx(train, rel=2e-3)


def test_flops_formula_worked_example():
    # Llama-7B-shaped, by hand: N_matmul = L·(4d² + 3dF) + V·d; attention 4·L·T·d per token.
    c = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32)
    n = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32000 * 4096
    v = values(c, seq_len=2048)
    assert v["flops.matmul_params"] == n
    assert v["flops.forward_per_token"] == 2 * n + 4 * 32 * 2048 * 4096
    causal_attn = 4 * 32 * 4096 * (2048 + 1) / 2
    assert v["flops.forward_per_token_causal"] == pytest.approx(2 * n + causal_attn)
    assert v["flops.train_per_token"] == 3 * v["flops.forward_per_token"]
    full = values(c, seq_len=2048, activation_checkpointing="full")
    assert full["flops.train_per_token_with_recompute"] == 4 * v["flops.forward_per_token"]


def test_moe_active_params():
    # Mixtral-8x7B-shaped: active = total − (E − k)·3·d·Fe·L.
    c = CONFIGS["mixtral"]
    v = values(c)
    assert v["params.active"] == v["params.total"] - (4 - 2) * 3 * 64 * 96 * 2


def test_chinchilla_prediction_for_chinchilla():
    # Chinchilla itself: N = 70B, D = 1.4T → L ≈ 1.937 under the approach-3 fit (Hoffmann et al. 2022).
    lines = {x.key: x.value for x in f.scaling(70_000_000_000, 1.4e12)}
    assert lines["scaling.predicted_loss"] == pytest.approx(1.937, abs=2e-3)
    assert lines["scaling.chinchilla_tokens"] == 1.4e12


def test_causal_average_with_window():
    arch = from_hf_config(CONFIGS["mistral"])  # every layer slides over 16 keys
    T = 64
    per_layer_keys = (16 * 17 / 2 + (T - 16) * 16) / T
    expected = 2 * 2 * 4 * per_layer_keys * (16 + 16)
    assert f.attention_flops_per_token(arch, T, causal=True) == pytest.approx(expected)
    assert math.isclose(f.attention_flops_per_token(arch, T), 2 * 2 * 4 * 16 * 32)
