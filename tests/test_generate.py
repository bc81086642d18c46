"""Decoding against transformers' `generate` on the same checkpoint, and against itself (batched vs alone)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.generation.logits_process import (  # noqa: E402
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mmctl.checkpoints import save  # noqa: E402
from mmctl.errors import UsageError  # noqa: E402
from mmctl.generate import SamplingConfig, generate, process_logits  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(mmctl model, the transformers model loaded from its checkpoint dir)."""
    torch.manual_seed(0)
    # a larger init than training uses, so a random model's greedy output wanders instead of repeating one token
    cfg = ModelConfig(vocab_size=128, hidden_size=128, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_embeddings=False, init_std=0.15)
    ours = Transformer(cfg).eval()
    path = save(ours, tmp_path_factory.mktemp("ckpt") / "model")
    return ours, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def hf_generate(model, prompts, **kwargs) -> list[list[int]]:
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, pad_token_id=0, do_sample=False, **kwargs)
    return out[:, T:].tolist()


def ids_of(generation) -> list[list[int]]:
    return [c.ids for c in generation.completions]


def test_greedy_matches_transformers(models):
    ours, theirs = models
    got = ids_of(generate(ours, PROMPTS, SamplingConfig(max_new_tokens=24)))
    assert got == hf_generate(theirs, PROMPTS, max_new_tokens=24)
    assert len(set(got[0])) > 5  # the test model does not just repeat itself


def test_repetition_penalty_matches_transformers(models):
    ours, theirs = models
    for prompt in PROMPTS[:2]:
        got = ids_of(generate(ours, [prompt], SamplingConfig(max_new_tokens=16, repetition_penalty=1.8)))
        assert got == hf_generate(theirs, [prompt], max_new_tokens=16, repetition_penalty=1.8)
        assert got != ids_of(generate(ours, [prompt], SamplingConfig(max_new_tokens=16)))


def test_batched_left_padded_equals_one_by_one(models):
    ours, _ = models
    sampling = SamplingConfig(max_new_tokens=16)
    alone = [ids_of(generate(ours, [p], sampling))[0] for p in PROMPTS]
    assert ids_of(generate(ours, PROMPTS, sampling)) == alone


def test_logit_processing_matches_transformers_processors():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 128, generator=g)
    history = torch.randint(0, 128, (4, 10), generator=g)
    seen = torch.zeros(4, 128, dtype=torch.bool).scatter_(1, history, True)
    sampling = SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = logits
    for processor in (RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
                      TopPLogitsWarper(0.8)):
        expected = processor(history, expected)
    got = process_logits(logits, sampling, seen)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = torch.isfinite(got).sum(-1)
    assert kept.min() > 1 and kept.max() < 20  # top-p cut inside the top-k, so both filters count
    assert torch.allclose(got[torch.isfinite(got)], expected[torch.isfinite(expected)])


def test_repetition_penalty_and_tiny_top_p_match_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, generator=g)
    history = torch.randint(0, 64, (2, 30), generator=g)
    seen = torch.zeros(2, 64, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits)  # negative logits are multiplied
    assert torch.allclose(process_logits(logits, SamplingConfig(repetition_penalty=1.5), seen), expected)
    tiny = process_logits(logits, SamplingConfig(temperature=1.0, top_p=1e-9))  # 1 - p rounds to 1 in float32
    assert torch.equal(torch.isinf(tiny), torch.isinf(TopPLogitsWarper(1e-9)(history, logits)))
    assert torch.isfinite(tiny).sum(-1).tolist() == [1, 1]


def test_sampling_is_deterministic_for_a_seed(models):
    ours, _ = models
    sample = SamplingConfig(max_new_tokens=16, temperature=1.5, top_p=0.95)
    first = ids_of(generate(ours, PROMPTS, sample))
    assert ids_of(generate(ours, PROMPTS, sample)) == first
    assert ids_of(generate(ours, PROMPTS, SamplingConfig(**{**vars(sample), "seed": 1}))) != first


def test_top_k_1_equals_greedy(models):
    ours, _ = models
    greedy = ids_of(generate(ours, PROMPTS, SamplingConfig(max_new_tokens=12)))
    assert ids_of(generate(ours, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=1))) == greedy


def test_stop_tokens_and_stop_strings(models):
    ours, _ = models
    full = ids_of(generate(ours, PROMPTS[:2], SamplingConfig(max_new_tokens=10)))
    stop = full[0][3]
    out = generate(ours, PROMPTS[:2], SamplingConfig(max_new_tokens=10), stop_token_ids=[stop])
    first = out.completions[0]
    assert (first.ids, first.finish_reason, first.stop) == (full[0][:full[0].index(stop) + 1], "stop", stop)
    if stop not in full[1]:
        assert (out.completions[1].ids, out.completions[1].finish_reason) == (full[1], "length")

    def decode(ids):
        return "".join(f"<{i}>" for i in ids)

    text = decode(full[1][2:4])  # a stop string spanning two tokens
    out = generate(ours, PROMPTS[1:2], SamplingConfig(max_new_tokens=10, stop_strings=[text]), decode=decode)
    assert (out.completions[0].ids, out.completions[0].stop) == (full[1][:4], text)
    with pytest.raises(UsageError, match="decode function"):
        generate(ours, PROMPTS, SamplingConfig(stop_strings=["x"]))


def test_streaming_sees_every_token_and_timing_is_reported(models):
    ours, _ = models
    streamed = [[] for _ in PROMPTS]

    def on_tokens(tokens):
        for row, t in zip(streamed, tokens, strict=True):
            if t is not None:
                row.append(t)

    out = generate(ours, PROMPTS, SamplingConfig(max_new_tokens=8), on_tokens=on_tokens)
    assert streamed == ids_of(out)
    assert out.time_to_first_token > 0 and out.decode_tokens_per_s > 0
    assert generate(ours, PROMPTS, SamplingConfig(max_new_tokens=1)).decode_tokens_per_s is None


def test_bad_requests_are_usage_errors(models):
    ours, _ = models
    with pytest.raises(UsageError, match="exceeds the model's context"):
        generate(ours, PROMPTS, SamplingConfig(max_new_tokens=510))
    with pytest.raises(UsageError, match="at least one token"):
        generate(ours, [[1], []])
