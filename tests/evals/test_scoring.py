"""Perplexity against transformers on the exported checkpoint; batch-size independence; a worked MC example."""

import math

import pytest
import torch

from mmctl import checkpoints  # noqa: E402
from mmctl.evals import multiple_choice, perplexity  # noqa: E402
from mmctl.evals.scoring import Score, loglikelihoods  # noqa: E402
from mmctl.evals.tasks import TaskConfig  # noqa: E402
from mmctl.tokenizer import bpe  # noqa: E402

DOCS = ["Once upon a time, there was a little cat named Tom. " * 6, "Question: What is 3 + 4?\nAnswer: 7",
        "A short one.", "naïve café " * 20]


def test_perplexity_equals_a_direct_transformers_computation(checkpoint):
    import transformers
    model, tok = checkpoints.load_lm(checkpoint), bpe.load(checkpoint)
    task = TaskConfig(kind="perplexity", data="x", stride=24)
    metrics, _ = perplexity.evaluate(model, tok, task, DOCS, batch_size=3, seed=0, stats={})
    ref = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    L, stride = model.cfg.max_position_embeddings, 24
    nats, count = 0.0, 0
    with torch.no_grad():
        for doc in DOCS:  # the rolling windows, computed directly from transformers' logits
            seq = [tok.eos_id] + tok.encode(doc)
            done = 0
            while done < len(seq) - 1:
                end = min(done + stride, len(seq) - 1) if done else min(L, len(seq) - 1)
                start = max(0, end + 1 - (L + 1))
                window = torch.tensor([seq[start:end + 1]])
                logp = torch.log_softmax(ref(window[:, :-1]).logits.double(), -1)[0]
                targets = window[0, 1:]
                scored = range(done - start, end - start)
                nats -= sum(logp[i, targets[i]].item() for i in scored)
                count += len(scored)
                done = end
    assert metrics["tokens"] == count
    assert metrics["nats_per_token"] == pytest.approx(nats / count, rel=1e-4)
    nbytes = sum(len(d.encode()) for d in DOCS)
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-4)


def test_rolling_windows_score_every_token_once():
    for n, L, stride in [(10, 4, 4), (10, 4, 1), (3, 8, 8), (17, 5, 3)]:
        ids = list(range(100, 100 + n))
        reqs = perplexity.rolling_requests(ids, 0, L, stride)
        assert [t for _, cont in reqs for t in cont] == ids
        assert all(len(ctx) + len(cont) <= L + 1 for ctx, cont in reqs)


def test_scores_do_not_depend_on_the_batch_size(checkpoint):
    model, tok = checkpoints.load_lm(checkpoint), bpe.load(checkpoint)
    requests = [(tok.encode(d[: 20 + 7 * i]), tok.encode(" and then")) for i, d in enumerate(DOCS * 3)]
    one = loglikelihoods(model, requests, batch_size=1)
    eight = loglikelihoods(model, requests, batch_size=8)
    for a, b in zip(one, eight, strict=True):
        assert a.greedy == b.greedy and a.tokens == b.tokens
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    from mmctl.evals.tasks import builtin_items

    items = builtin_items("stories-mc", 12)
    task = TaskConfig(builtin="stories-mc")
    m1, _ = multiple_choice.evaluate(model, tok, task, items, batch_size=1, seed=0, stats={})
    m8, _ = multiple_choice.evaluate(model, tok, task, items, batch_size=8, seed=0, stats={})
    assert (m1["acc"], m1["acc_norm"]) == (m8["acc"], m8["acc_norm"])


def test_multiple_choice_worked_example(monkeypatch):
    # Two items. Item 1: log-probs [-2, -3, -1.5] over choices "a bb", "c", "dddddd" (4, 1, 6 characters):
    # acc picks choice 2 (-1.5) = answer 2 ✓; acc_norm picks max(-0.5, -3, -0.25) = choice 2 ✓.
    # Item 2: [-1, -4] over "x", "yyyyyyyyy" (1, 9): acc picks 0 ✗ (answer 1); acc_norm -1 vs -0.44 picks 1 ✓.
    items = [{"context": "Q1", "choices": ["a bb", "c", "dddddd"], "answer": 2},
             {"context": "Q2", "choices": ["x", "yyyyyyyyy"], "answer": 1}]
    fake = [-2.0, -3.0, -1.5, -1.0, -4.0]
    monkeypatch.setattr(multiple_choice, "loglikelihoods",
                        lambda model, reqs, **kw: [Score(lp, False, 1) for lp in fake])

    class Tok:
        def encode(self, text):
            return [1]

    metrics, samples = multiple_choice.evaluate(None, Tok(), TaskConfig(kind="multiple_choice", data="x"), items,
                                                batch_size=1, seed=0, stats={})
    assert metrics["acc"] == 0.5 and metrics["acc_norm"] == 1.0
    assert [s["prediction"] for s in samples] == [2, 0] and [s["prediction_norm"] for s in samples] == [2, 1]
    assert metrics["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_acc_norm_divides_by_the_choice_without_its_delimiter(monkeypatch):
    # lm-eval's rule: "a" (1 char) at -2 beats "bb" (2 chars) at -3.9 by total, but -3.9/2 > -2/1 per character.
    monkeypatch.setattr(multiple_choice, "loglikelihoods", lambda model, reqs, **kw: [Score(-2.0, False, 1),
                                                                                       Score(-3.9, False, 1)])

    class Tok:
        def encode(self, text):
            return [1]

    items = [{"context": "Q", "choices": ["a", "bb"], "answer": 1}]
    metrics, _ = multiple_choice.evaluate(None, Tok(), TaskConfig(kind="multiple_choice", data="x"), items,
                                          batch_size=1, seed=0, stats={})
    assert (metrics["acc"], metrics["acc_norm"]) == (0.0, 1.0)
