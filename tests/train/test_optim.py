"""Schedules against their closed forms, and the decay / no-decay split."""

import math

import pytest

from mmctl.train.optim import OptimConfig, lr_at, make_optimizer


def test_cosine_closed_form():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    total = 110
    for step in range(total):
        if step < 10:
            expected = (step + 1) / 10
        else:
            progress = (step - 10) / (total - 10 - 1)
            expected = 0.1 + 0.45 * (1 + math.cos(math.pi * progress))
        assert lr_at(step, total, cfg) == pytest.approx(expected)
    assert lr_at(9, total, cfg) == 1.0 and lr_at(10, total, cfg) == 1.0 and lr_at(total - 1, total, cfg) == 0.1


def test_wsd_closed_form():
    cfg = OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.25)
    total = 100  # stable from step 5 to 74, linear decay over steps 75..99 to exactly min_lr
    assert [lr_at(s, total, cfg) for s in (0, 4)] == [pytest.approx(0.4), pytest.approx(2.0)]
    assert all(lr_at(s, total, cfg) == 2.0 for s in range(5, 75))
    for s in range(75, 100):
        assert lr_at(s, total, cfg) == pytest.approx(2.0 * (1 - (s - 74) / 25))
    assert lr_at(99, total, cfg) == 0.0


def test_constant_and_no_warmup():
    cfg = OptimConfig(lr=0.5, warmup_steps=0, schedule="constant")
    assert {lr_at(s, 10, cfg) for s in range(10)} == {0.5}


def test_parameter_groups():
    import torch
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(p.dim() for p in decay["params"]) == [2, 2]
    assert sorted(p.dim() for p in no_decay["params"]) == [1, 1, 1]


def test_min_lr_above_lr_is_refused():
    assert OptimConfig(lr=1e-4, min_lr=1e-3).check()[0][0] == "min_lr"


def test_the_fused_adamw_steps_as_the_reference_loop_does():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    ours = make_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1))
    assert ours.defaults["fused"]
    reference = torch.optim.AdamW([{"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(5):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, ours), (twin, reference)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
