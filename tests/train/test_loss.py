"""The chunked head + cross-entropy (mmctl/train/loss.py) equals the plain path — logits for every position, then
F.cross_entropy — in its loss and in every gradient: fp32 exactly up to summation order, bf16 autocast as closely
as two bf16 roundings allow; with weighted and left-out positions, chunks that do not divide the rows, a frozen
head, a tied head and no gradient at all."""

from __future__ import annotations

import copy

import pytest
import torch

F = torch.nn.functional

from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from mmctl.train.loss import linear_cross_entropy, token_loss  # noqa: E402


def plain(hidden, weight, targets, weights):
    per_token = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    return (per_token * weights).sum()


def tensors(seed=0, N=300, C=32, V=97):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * 0.3).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    weights = (torch.rand(N, generator=g) > 0.3).float() * torch.rand(N, generator=g) * 2  # some left out
    return hidden, weight, targets, weights


def grads(loss_fn, hidden, weight, *rest):
    hidden, weight = hidden.detach().clone().requires_grad_(hidden.requires_grad), weight.detach().clone() \
        .requires_grad_(weight.requires_grad)
    loss = loss_fn(hidden, weight, *rest)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk", [64, 77, 1024])
def test_loss_and_gradients_equal_the_plain_path(chunk):
    hidden, weight, targets, weights = tensors()
    ours = grads(lambda h, w, t, x: linear_cross_entropy(h, w, t, x, chunk=chunk), hidden, weight, targets, weights)
    ref = grads(plain, hidden, weight, targets, weights)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_under_bf16_autocast_it_rounds_like_the_plain_path():
    hidden, weight, targets, weights = tensors(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(lambda h, w, t, x: linear_cross_entropy(h, w, t, x, chunk=50), hidden, weight, targets, weights)
        ref = grads(plain, hidden, weight, targets, weights)
    exact = grads(plain, *(x.double() for x in (hidden, weight)), targets, weights.double())
    assert ours[1].dtype == ref[1].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=2e-3, atol=0)
    for a, b, c in zip(ours, ref, exact, strict=True):  # no further from the float64 truth than the plain path
        assert (a.double() - c).abs().max() <= 1.5 * (b.double() - c).abs().max() + 1e-6


def test_a_frozen_head_and_no_grad():
    hidden, weight, targets, weights = tensors(2)
    weight.requires_grad_(False)
    loss, grad_hidden, grad_weight = grads(linear_cross_entropy, hidden, weight, targets, weights)
    assert grad_weight is None
    torch.testing.assert_close(grad_hidden, grads(plain, hidden, weight, targets, weights)[1])
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, weights, chunk=40), loss)


def test_through_a_tied_model_every_parameter_gets_the_plain_gradient():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_position_embeddings=64))
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 96, (3, 17))
    weights = torch.rand(3, 16)
    token_loss(model, ids[:, :-1], ids[:, 1:], weights).backward()
    logits = twin(ids[:, :-1])
    (F.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1), reduction="none") * weights.reshape(-1)) \
        .sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
