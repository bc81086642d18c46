"""LoRA against its definition and against PEFT: a fresh adapter changes nothing, merged equals unmerged, and
adapters cross between mmctl and PEFT (same logits on the transformers base model) in both directions."""

from __future__ import annotations

import pytest
import torch

from mmctl import checkpoints  # noqa: E402
from mmctl.errors import UsageError  # noqa: E402
from mmctl.models import lora  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_embeddings=False)
IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def base() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def trained_adapters(model, seed=1):
    """Give every B non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_a_fresh_adapter_is_the_base_model_and_only_adapters_train():
    model, reference = base(), base()
    wrapped = lora.apply_lora(model, lora.LoRAConfig(r=4))
    assert len(wrapped) == 7 * CFG.num_layers
    assert torch.equal(model(IDS), reference(IDS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)


@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_unmerged(rslora):
    model = base()
    lora.apply_lora(model, lora.LoRAConfig(r=8, alpha=16, rslora=rslora, target_modules=["q_proj", "down_proj"]))
    trained_adapters(model)
    unmerged = model(IDS)
    merged = lora.merge(model)(IDS)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(base().state_dict())  # the base's names again: an ordinary checkpoint


def test_unknown_target_is_a_recipe_error():
    with pytest.raises(UsageError, match="qkv_proj"):
        lora.apply_lora(base(), lora.LoRAConfig(target_modules=["qkv_proj"]))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_mmctl_adapters_and_mmctl_loads_peft_adapters(tmp_path, rslora):
    import peft
    import transformers
    ours = base()
    checkpoints.save(ours, tmp_path / "base")
    cfg = lora.LoRAConfig(r=4, alpha=8, rslora=rslora)
    lora.apply_lora(ours, cfg)
    trained_adapters(ours)
    lora.save_adapter(ours, tmp_path / "adapter", cfg, base_model=str(tmp_path / "base"))

    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (theirs(input_ids=IDS).logits - ours(IDS)).abs().max() <= 1e-5

    theirs.save_pretrained(tmp_path / "from-peft")  # and back: PEFT's own files into mmctl
    again = base()
    loaded = lora.load_adapter(again, tmp_path / "from-peft")
    assert (loaded.r, loaded.alpha, loaded.rslora) == (4, 8, rslora)
    assert (again(IDS) - ours(IDS)).abs().max() <= 1e-5


def test_under_autocast_the_adapter_keeps_the_base_layers_dtype():
    layer = lora.LoRALinear(torch.nn.Linear(32, 16), r=4, scaling=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an fp32 input, as an RMSNorm hands it on
        assert layer(torch.randn(3, 32)).dtype == layer.base_layer(torch.randn(3, 32)).dtype == torch.bfloat16


@pytest.mark.parametrize("tied", [False, True])
def test_trainable_token_rows_cross_with_peft_merge_and_disable(tmp_path, tied):
    """`trainable_tokens`: only the listed rows and the adapters train; PEFT's `trainable_token_indices` adapter
    gives the same logits both ways (a tied head reads the new rows, as PEFT's does); merged equals unmerged;
    `disabled` is the base."""
    import dataclasses

    import peft
    import transformers

    torch.manual_seed(0)
    ours = Transformer(dataclasses.replace(CFG, tie_embeddings=tied)).eval()
    checkpoints.save(ours, tmp_path / "base")
    reference = checkpoints.load_lm(tmp_path / "base").eval()
    cfg = lora.LoRAConfig(r=4, alpha=8)
    lora.apply_lora(ours, cfg, [3, 17, 40])
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if n.endswith(("lora_A.weight", "lora_B.weight"))} | {
        "model.embed_tokens.delta"}
    trained_adapters(ours)
    with torch.no_grad():
        ours.model.embed_tokens.delta.normal_(0, 1.0)
        with lora.disabled(ours):
            assert torch.equal(ours(IDS), reference(IDS))
    lora.save_adapter(ours, tmp_path / "adapter", cfg, base_model=str(tmp_path / "base"))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(IDS)
        assert (theirs(input_ids=IDS).logits - expected).abs().max() <= 1e-5
    theirs.save_pretrained(tmp_path / "from-peft")
    again = checkpoints.load_lm(tmp_path / "base").eval()
    lora.load_adapter(again, tmp_path / "from-peft")
    with torch.no_grad():
        assert (again(IDS) - expected).abs().max() <= 1e-5
        merged = lora.merge(ours)
        assert (merged(IDS) - expected).abs().max() <= 1e-5
    assert set(merged.state_dict()) == set(reference.state_dict())
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied


def test_trainable_tokens_are_one_token_each():
    class Tok:  # a tokenizer's two lookups: a special token by its string, any other by encoding
        def token_id(self, t):
            return {"<|user|>": 4}.get(t)

        def encode(self, t):
            return [ord(c) for c in t]

    assert lora.token_ids(Tok(), ["7", "<|user|>", "7"]) == [4, 55]
    with pytest.raises(UsageError, match="'so' is 2 tokens"):
        lora.token_ids(Tok(), ["so"])
