"""Reading config.json: family defaults as transformers has them, and clear errors naming the field."""

import pytest

from mmctl.accounting.arch import from_hf_config
from mmctl.errors import UsageError


def test_missing_fields_take_the_family_defaults():
    from mmctl.accounting import formulas
    from tests.reference import hf_params

    for config in ({"model_type": "llama"}, {"model_type": "gpt2"}, {"model_type": "qwen2", "num_hidden_layers": 2}):
        arch = from_hf_config(config)
        assert next(x.value for x in formulas.params(arch) if x.key == "params.total") == hf_params(config)


def test_explicit_head_dim_is_used_not_derived():
    # Gemma-2 9B: hidden 3584 / 16 heads = 224, but head_dim is 256.
    arch = from_hf_config({"model_type": "gemma2", "hidden_size": 3584, "num_attention_heads": 16, "head_dim": 256})
    assert arch.head_dim == 256


@pytest.mark.parametrize("config, fragment", [
    ({"model_type": "bert"}, "config.model_type: 'bert' is not supported"),
    ({}, "config.model_type: None is not supported"),
    ({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}, "config.hidden_size: 100 is not divisible"),
    ({"model_type": "llama", "num_key_value_heads": 5}, "config.num_key_value_heads: 5 must divide"),
    ({"model_type": "llama", "vocab_size": -1}, "config.vocab_size: expected an integer ≥ 1"),
    ({"model_type": "llama", "num_hidden_layers": "32"}, "config.num_hidden_layers: expected an integer"),
    ({"model_type": "mixtral", "num_experts_per_tok": 9}, "config.num_experts_per_tok: 9 exceeds"),
])
def test_bad_configs_are_usage_errors(config, fragment):
    with pytest.raises(UsageError) as e:
        from_hf_config(config)
    assert any(fragment in p for p in e.value.problems), e.value.problems
