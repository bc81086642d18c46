"""bitsandbytes 4-bit layers as QLoRA uses them: NF4 checked against the paper's code table by hand, exact
products at any shape and in eval mode, a dense round trip, and QLoRA training only the adapters."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from torch import nn  # noqa: E402

from mmctl.quant import bnb  # noqa: E402

# The 16 NF4 values (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def nf4_by_hand(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Round-to-nearest NF4 with one absmax scale per block of 64 consecutive values (row-major)."""
    flat = w.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % block)]).view(-1, block)
    scale = flat.abs().amax(dim=1, keepdim=True)
    codes = (flat / scale).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[codes] * scale).reshape(-1)[: w.numel()].view_as(w)


def model(*shapes) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(i, o, bias=b) for i, o, b in shapes))


def test_nf4_is_the_papers_code_per_block_of_64():
    net = model((128, 96, False))
    w = net[0].weight.detach().clone()
    bnb.to_4bit(net, bnb.QLoRAConfig(double_quant=False))
    got = bnb.dequantized(net[0])
    assert got.dtype == w.dtype and got.shape == w.shape
    torch.testing.assert_close(got, nf4_by_hand(w), rtol=0, atol=1e-6)
    assert (got - w).abs().max() <= w.abs().max() * NF4.diff().max() / 2 + 1e-6  # half the widest gap


@pytest.mark.parametrize("double_quant", [False, True])
def test_products_are_exact_at_any_shape_in_train_and_eval_mode(double_quant):
    net = model((40, 36, True), (36, 64, False))  # dims that are not multiples of 32 on purpose
    assert bnb.to_4bit(net, bnb.QLoRAConfig(double_quant=double_quant)) == ["0", "1"]
    x = torch.randn(3, 40)
    for mode in (net.eval, net.train):  # eval mode must not repack for bitsandbytes' bf16 CPU kernel
        mode()
        h = x @ bnb.dequantized(net[0]).T + net[0].bias
        quantized = net(x)
        torch.testing.assert_close(quantized, h @ bnb.dequantized(net[1]).T, rtol=0, atol=0)
    dense = bnb.to_dense(net)
    assert all(type(m) is nn.Linear for m in dense)
    torch.testing.assert_close(dense(x), quantized, rtol=0, atol=0)
    assert not bnb.is_4bit(dense[0]) and not dense[0].weight.requires_grad


def test_qlora_trains_only_the_adapters_and_its_loss_falls():
    from mmctl.models import lora

    net = model((64, 64, False), (64, 64, False))
    bnb.to_4bit(net, bnb.QLoRAConfig())
    lora.apply_lora(net, lora.LoRAConfig(r=4, alpha=8, target_modules=["0", "1"]))
    frozen = {n: t.clone() for n, t in net.state_dict().items() if "lora_" not in n}
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    after = net.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())  # the 4-bit bytes and their scales
    with torch.no_grad():
        adapted = net(x)
        merged = bnb.to_dense(lora.merge(net))
        torch.testing.assert_close(merged(x), adapted, rtol=0, atol=1e-5)
