"""The decoder LM on its own: config rules, init, padding, and KV-cache decoding against full recomputation.

Agreement with transformers' logits is in test_hf.py, where the same weights are loaded both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mmctl import recipe  # noqa: E402
from mmctl.errors import UsageError  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


def model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).eval()


def test_check_reports_cross_field_rules():
    assert ModelConfig(**SMALL).check() == []
    fields = [f for f, _ in ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=96).check()]
    assert fields == ["num_kv_heads"]
    assert [f for f, _ in ModelConfig(hidden_size=100, num_heads=8).check()] == ["num_heads"]
    assert [f for f, _ in ModelConfig(head_dim=7).check()] == ["head_dim"]
    assert [f for f, _ in ModelConfig(rope_scaling={"factor": 8.0}).check()] == ["rope_scaling"]
    with pytest.raises(UsageError, match="model.num_kv_heads"):
        Transformer(ModelConfig(num_heads=4, num_kv_heads=3))


def test_config_is_a_recipe_section():
    @dataclass
    class Stage:
        model: ModelConfig = recipe.option(ModelConfig, "the architecture")

    text = "model:\n  hidden_size: 96\n  num_heads: 6\n  num_kv_heads: 4\n  rope_scaling: {factor: 8}\n"
    data, source = recipe.parse(text, "stage.yaml")
    with pytest.raises(UsageError) as e:
        recipe.build(Stage, data, source)
    assert any("stage.yaml:4: model.num_kv_heads" in p for p in e.value.problems)
    assert any("model.rope_scaling" in p for p in e.value.problems)
    good = recipe.build(Stage, *recipe.parse("model:\n  num_layers: 3\n  head_dim: 64\n", "s.yaml"))
    assert good.model.num_layers == 3 and good.model.head_size == 64


def test_init_scales_residual_projections_and_ties_embeddings():
    m = Transformer(ModelConfig(hidden_size=256, intermediate_size=512, num_layers=8, num_heads=4, num_kv_heads=4,
                                qkv_bias=True))
    block = m.model.layers[0]
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    for proj in (block.self_attn.o_proj, block.mlp.down_proj):
        assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert torch.all(block.self_attn.q_proj.bias == 0) and torch.all(block.input_layernorm.weight == 1)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert model(tie_embeddings=False).lm_head.weight is not model(tie_embeddings=False).model.embed_tokens.weight


def test_left_padding_gives_the_same_logits_as_no_padding():
    m = model()
    ids = torch.randint(0, 128, (1, 10))
    padded = torch.cat([torch.full((1, 5), 7), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], dim=1).long()
    with torch.no_grad():
        alone, together = m(ids), m(padded, attention_mask=mask)
    assert (together[:, 5:] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])  # MQA, GQA, MHA
def test_kv_cache_decoding_equals_full_recomputation(num_kv_heads):
    m = model(num_kv_heads=num_kv_heads, qkv_bias=True)
    for p in m.parameters():  # biases and norms away from their init, so every path is exercised
        p.data.normal_(0, 0.3)
    B, T, prompt = 3, 20, 8
    ids = torch.randint(0, 128, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding of different lengths
    mask[2, :5] = 0
    with torch.no_grad():
        full = m(ids, attention_mask=mask)  # (B, T, V)
        cache = m.new_cache(B, T)
        steps = [m(ids[:, :4], attention_mask=mask[:, :4], cache=cache),  # prefill in two chunks,
                 m(ids[:, 4:prompt], attention_mask=mask[:, 4:prompt], cache=cache)]  # the second at an offset
        steps += [m(ids[:, t:t + 1], cache=cache) for t in range(prompt, T)]  # decode, one token at a time
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    assert (incremental - full)[real].abs().max() < 1e-5
    assert cache.length == T


def test_last_only_returns_the_last_position():
    m = model()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert (m(ids, last_only=True) - m(ids)[:, -1:]).abs().max() < 1e-6  # not bitwise: GEMM shapes differ


def test_context_limit_is_enforced():
    m = model(max_position_embeddings=16)
    with pytest.raises(UsageError, match="max_position_embeddings = 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_packed_documents_compute_what_each_document_computes_alone():
    from mmctl.models.transformer import positions_in_documents

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_position_embeddings=64)).eval()
    docs = [torch.randint(0, 96, (n,)) for n in (5, 9, 3)]
    packed = torch.cat(docs)[None]  # (1, 17)
    ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    assert positions_in_documents(ids).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]]
    with torch.no_grad():
        together = model(packed, document_ids=ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        plain = model(packed)[0]
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(plain[5:], alone[5:], atol=1e-3)  # without the mask, later documents see earlier ones


def test_inputs_embeds_equal_input_ids():
    """A VLM writes image features into the embeddings and runs the same decoder on them."""
    m = model()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    expected = m(ids, attention_mask=mask)
    assert torch.equal(m(inputs_embeds=m.model.embed_tokens(ids), attention_mask=mask), expected)
    with pytest.raises(ValueError, match="exactly one"):
        m(ids, inputs_embeds=m.model.embed_tokens(ids))


def test_device_and_dtype_come_from_the_embeddings():
    """A swapped-in int8 head (quantization) must not make the KV cache int8."""
    m = model()
    m.lm_head.weight = torch.nn.Parameter(torch.zeros(128, 128, dtype=torch.int8), requires_grad=False)
    assert m.dtype == torch.float32 and m.device == torch.device("cpu")
    assert m.new_cache(1, 4).k[0].dtype == torch.float32


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for recompute in (False, True):
        m = model().train()
        if recompute:
            m.gradient_checkpointing_enable()
        m(ids).float().pow(2).mean().backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"qkv_bias": True}, {"head_dim": 48}])
def test_parameter_count_by_arithmetic(overrides):
    cfg = ModelConfig(**{**SMALL, **overrides})
    assert cfg.num_parameters() == sum(p.numel() for p in Transformer(cfg).parameters())
