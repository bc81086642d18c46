"""Every named architecture: it loads, and mmctl's count equals transformers' model built from it."""

import pytest

from mmctl import presets
from mmctl.accounting import formulas
from mmctl.accounting.arch import from_hf_config

# Published totals (model cards / papers) that pin the preset files themselves.
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2-xl": 1_557_611_200, "llama-7b": 6_738_415_616, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "llama-3.1-405b": 405_853_388_800, "llama-3.2-1b": 1_235_814_400,
    "mistral-7b": 7_241_732_096, "mixtral-8x7b": 46_702_792_704, "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512, "gemma-2-2b": 2_614_341_888, "gemma-2-27b": 27_227_128_320,
    "phi-3-mini": 3_821_079_552, "smollm2-135m": 134_515_008, "olmo-2-7b": 7_298_617_344,
}


def total(name: str) -> int:
    arch = from_hf_config(presets.load_model(name)["config"], name)
    return next(int(x.value) for x in formulas.params(arch) if x.key == "params.total")


def test_at_least_thirty_presets_and_all_families():
    names = presets.model_names()
    assert len(names) >= 30
    families = {presets.load_model(n)["config"]["model_type"] for n in names}
    assert families == {"gpt2", "llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3", "olmo2", "deepseek_v3"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_totals(name):
    assert total(name) == PUBLISHED[name]


@pytest.mark.parametrize("name", presets.model_names())
def test_preset_equals_transformers(name):
    from tests.reference import hf_params

    assert total(name) == hf_params(presets.load_model(name)["config"])


def test_hardware_presets_are_dense_and_complete():
    for name, spec in presets.hardware().items():
        assert spec["peak_flops"], name
        assert all(isinstance(v, float) for v in spec["peak_flops"].values()), name
        assert spec["memory_gb"] > 0 and spec["bandwidth"] > 0, name
    # H100 SXM: 989 dense bf16 TFLOP/s (1979 is the 2:4-sparse headline); A100: 312.
    assert presets.hardware()["h100-sxm"]["peak_flops"]["bf16"] == pytest.approx(989.4e12)
    assert presets.hardware()["a100"]["peak_flops"]["bf16"] == pytest.approx(312e12)
