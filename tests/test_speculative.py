"""Speculative decoding gives the target's own greedy tokens, whatever the draft guesses: a draft that is the
target (every guess kept), an unrelated random draft (most rejected), several k, stop tokens and the length cap."""

from __future__ import annotations

import pytest
import torch

from mmctl import speculative  # noqa: E402
from mmctl.errors import UsageError  # noqa: E402
from mmctl.generate import SamplingConfig, generate  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def model(layers: int, seed: int, vocab: int = 64) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=layers,
                                num_heads=4, num_kv_heads=2, max_position_embeddings=96)).eval()
    with torch.no_grad():  # sharper than the init's near-uniform logits, so the greedy path is not a coin toss
        m.lm_head.weight.mul_(8)
    return m


def greedy(target, prompt, n, stops=()):
    return generate(target, [prompt], SamplingConfig(max_new_tokens=n), stop_token_ids=stops).completions[0].ids


@pytest.mark.parametrize("k, fused", [(1, False), (3, False), (5, False), (3, True)])
def test_the_output_is_the_targets_greedy_output(k, fused):
    target, draft = model(2, 0), model(1, 1)
    if fused:  # as `mmctl generate --draft` loads them: the draft guesses through the fast step
        from mmctl.models import fast_decode

        assert fast_decode.fuse(target) and fast_decode.fuse(draft)
    prompt = [3, 14, 15, 9, 26]
    result = speculative.generate(target, draft, prompt, 40, k=k)
    assert result.completion.ids == greedy(target, prompt, 40)
    assert result.completion.finish_reason == "length" and len(result.completion.ids) == 40
    assert 0 <= result.accepted <= result.drafted and result.target_forwards < 40 + 1


def test_a_perfect_draft_is_always_accepted_and_needs_few_target_forwards():
    target = model(2, 0)
    result = speculative.generate(target, target, [1, 2, 3], 41, k=4)
    assert result.completion.ids == greedy(target, [1, 2, 3], 41)
    assert result.acceptance_rate == 1.0 and result.target_forwards == 8  # 5 tokens per check after the first
    assert result.tokens_per_target_forward == pytest.approx(41 / 8)


def test_stop_tokens_end_it_where_plain_decoding_ends():
    target, draft = model(2, 0), model(1, 2)
    plain = greedy(target, [5, 6], 40)
    stop = plain[7]
    result = speculative.generate(target, draft, [5, 6], 40, k=3, stop_token_ids=[stop])
    assert result.completion.ids == greedy(target, [5, 6], 40, stops=[stop])
    assert result.completion.finish_reason == "stop" and result.completion.ids[-1] == stop


def test_mismatched_models_and_long_prompts_are_refused():
    with pytest.raises(UsageError, match="vocabulary"):
        speculative.generate(model(2, 0), model(1, 1, vocab=32), [1, 2], 5)
    with pytest.raises(UsageError, match="context"):
        speculative.generate(model(2, 0), model(1, 1), list(range(60)), 40)
