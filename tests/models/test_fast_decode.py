"""The fast decode step (mmctl/models/fast_decode.py) decodes what the model's forward decodes: the same logits
after fusing, the same greedy and sampled tokens with left padding, GQA and q/k/v biases, compiled or not — and it
holds no weight twice, keeps the checkpoint's names, and steps aside for layers it does not handle."""

from __future__ import annotations

import copy

import pytest
import torch

from mmctl import checkpoints  # noqa: E402
from mmctl.errors import UsageError  # noqa: E402
from mmctl.generate import SamplingConfig, generate  # noqa: E402
from mmctl.models import fast_decode  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[3, 14, 15, 9, 26, 5], [35, 8], [9, 7, 9, 3]]  # left-padded together


def model(tie: bool = True, bias: bool = False, kv_heads: int = 2) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                num_kv_heads=kv_heads, max_position_embeddings=128, tie_embeddings=tie,
                                qkv_bias=bias)).eval()
    with torch.no_grad():  # sharper than the init's near-uniform logits, so greedy paths are not coin tosses
        m.lm_head.weight.mul_(8)
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return m


def completions(m, sampling, **kwargs):
    return [c.ids for c in generate(m, PROMPTS, sampling, **kwargs).completions]


@pytest.mark.parametrize("tie, bias, kv_heads", [(True, False, 2), (False, True, 4), (True, False, 1)])
def test_fused_decoding_gives_the_models_tokens_and_logits(tie, bias, kv_heads):
    plain = model(tie, bias, kv_heads)
    fused = copy.deepcopy(plain)
    assert fast_decode.fuse(fused) and fast_decode.is_fused(fused)
    ids = torch.tensor(PROMPTS[0])[None]
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), rtol=0, atol=1e-5)
    for sampling in (SamplingConfig(max_new_tokens=30), SamplingConfig(max_new_tokens=30, temperature=0.9, seed=3)):
        assert completions(fused, sampling) == completions(plain, sampling)


def test_fusing_holds_no_weight_twice_and_keeps_the_checkpoint(tmp_path):
    plain, fused = model(), model()
    fast_decode.fuse(fused)
    attn = fused.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # q, k, v are row blocks of the fused one
    assert attn.o_proj.weight.stride() == (1, attn.o_proj.weight.shape[0])  # stored input-major
    assert fused.state_dict().keys() == plain.state_dict().keys()
    for name, t in fused.state_dict().items():
        assert torch.equal(t, plain.state_dict()[name]), name
    checkpoints.save(fused, tmp_path / "ckpt")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.equal(checkpoints.load_lm(tmp_path / "ckpt")(ids), plain(ids))


def test_fused_weights_and_biases_follow_in_place_updates():
    """An optimizer step or a load_state_dict after fusing changes what the fast step reads, biases included."""
    fused, other = model(bias=True), model(bias=True)
    fast_decode.fuse(fused)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    fused.load_state_dict(other.state_dict())  # copies into the existing (view) tensors
    assert fast_decode.is_fused(fused)
    sampling = SamplingConfig(max_new_tokens=20)
    assert completions(fused, sampling) == completions(other, sampling)
    logits = fast_decode.decode(fused, torch.tensor([3]), torch.tensor([0]), cache := fused.new_cache(1, 1))
    with torch.no_grad():
        torch.testing.assert_close(logits, other(torch.tensor([[3]]))[:, -1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 1 tokens"):
        fast_decode.decode(fused, torch.tensor([3]), torch.tensor([1]), cache)


def test_it_steps_aside_for_layers_it_does_not_handle():
    from mmctl.models.lora import LoRAConfig, apply_lora

    m = model()
    apply_lora(m, LoRAConfig(r=4))
    assert not fast_decode.fuse(m) and not fast_decode.is_fused(m)
    with pytest.raises(UsageError, match="compiled decoding"):
        generate(m, PROMPTS, SamplingConfig(max_new_tokens=3), compile=True)
    converted = model()
    fast_decode.fuse(converted)
    converted.to(torch.float64)  # new tensors: the fused weights no longer back the layers
    assert not fast_decode.is_fused(converted)  # so generate takes the forward path, not stale weights


def test_the_compiled_step_gives_the_eager_tokens_and_compiles_once():
    torch._dynamo.reset()
    plain, fused = model(), model()
    fast_decode.fuse(fused)
    sampling = SamplingConfig(max_new_tokens=24)
    graphs = torch._dynamo.utils.counters["stats"]
    first = generate(fused, PROMPTS, sampling, compile=True)
    built = graphs["unique_graphs"]
    assert [c.ids for c in first.completions] == completions(plain, sampling)
    assert first.compile_seconds > 0 and first.decode_tokens_per_s > 0
    again = generate(fused, [p[::-1] for p in PROMPTS], sampling, compile=True)  # new cache, same shapes
    assert [c.ids for c in again.completions] == [c.ids for c in generate(plain, [p[::-1] for p in PROMPTS],
                                                                            sampling).completions]
    assert built >= 1 and graphs["unique_graphs"] == built  # replayed, not rebuilt


def test_cache_lengths_are_few():
    assert [fast_decode.cache_length(n, 2048) for n in (1, 64, 65, 130, 1000)] == [64, 64, 128, 256, 1024]
    assert fast_decode.cache_length(100, 96) == 100  # never below what is needed
    assert fast_decode.cache_length(90, 96) == 96  # never above the context when it fits
