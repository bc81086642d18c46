"""Round-to-nearest and GPTQ against their definitions: errors within half a step, packing exact, the blocked GPTQ
equal to the paper's update applied column by column, and GPTQ's output error at most RTN's (less when the
inputs are correlated, which is what it exploits)."""

from __future__ import annotations

import pytest
import torch

from mmctl.quant import gptq, linear, rtn  # noqa: E402


def test_int8_rows_round_to_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.rand(16, 1) * 3
    w[3] = 0  # an all-zero row stays zero
    q, scale = rtn.int8_rows(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (w - q.float() * scale).abs()
    assert torch.all(err <= scale / 2 + 1e-6)
    assert torch.equal(q[3], torch.zeros(64, dtype=torch.int8))
    assert torch.equal(q.abs().amax(1)[torch.arange(16) != 3], torch.full((15,), 127, dtype=torch.int8))


@pytest.mark.parametrize("bits, group", [(4, 32), (4, 64), (3, 32), (8, 128)])
def test_groups_round_to_within_half_a_step_and_keep_zero(bits, group):
    torch.manual_seed(1)
    w = torch.randn(8, 128) + 0.5
    w[0, :group] = 0
    codes, scale, zero = rtn.groups(w, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1 and scale.shape == (8, 128 // group)
    back = rtn.dequantize_groups(codes, scale, zero)
    step = scale.repeat_interleave(group, dim=1)
    assert torch.all((w - back).abs() <= step / 2 + 1e-6)
    assert torch.equal(back[0, :group], torch.zeros(group))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips_exactly(bits):
    from mmctl.quant.linear import pack, unpack

    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)
    if bits == 4:  # two codes per byte, the first in the low nibble
        assert pack(torch.tensor([[1, 2, 0, 0, 0, 0, 0, 15]], dtype=torch.uint8), 4).tolist() == [[0x21, 0, 0, 0xF0]]
    with pytest.raises(ValueError):
        pack(torch.zeros(1, 12, dtype=torch.uint8), 3)


def test_a_quantized_linear_computes_with_its_dequantized_weight():
    from mmctl.quant.linear import QuantLinear

    torch.manual_seed(6)
    dense = torch.nn.Linear(64, 32)
    x = torch.randn(3, 64)
    q8, s8 = rtn.int8_rows(dense.weight.detach())
    layer = QuantLinear.from_codes(q8, s8, None, 8, None, dense.bias.detach())
    torch.testing.assert_close(layer(x), x @ (q8.float() * s8).T + dense.bias.detach())
    for bits, group in ((4, 32), (3, 16)):
        codes, scale, zero = rtn.groups(dense.weight.detach(), bits, group)
        layer = QuantLinear.from_codes(codes, scale, zero, bits, group)
        torch.testing.assert_close(layer.weight(), rtn.dequantize_groups(codes, scale, zero))
        # codes, a float32 scale and a uint8 zero point per group, an int32 group index per input
        holder = torch.nn.Module()
        holder.layer = layer
        assert linear.stored_bits(holder, ["layer"]) == \
            pytest.approx(bits + 32 / group + 8 / group + 32 / 32)
    result = gptq.gptq(dense.weight.detach(), gptq.hessian(torch.randn(200, 64)), bits=4, group=16, act_order=True)
    layer = QuantLinear.from_codes(result.codes, result.scale, result.zero, 4, 16, g_idx=result.g_idx)
    torch.testing.assert_close(layer.weight(), result.weight())


def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Tokens whose features are strongly correlated (a few latent factors) with uneven scales — like a
    transformer's activations, unlike white noise."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 8, generator=g)
    return latent @ torch.randn(8, dim, generator=g) + 0.1 * torch.randn(n, dim, generator=g)


def gptq_by_column(w, h, bits, group, damp=0.01, act_order=False):
    """The paper's update applied directly, column by column, to every later column at once (no blocks, no lazy
    batching): Ŵ in the original column order."""
    w, u, order = gptq.prepare(w, h, damp, act_order)
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        if i % group == 0:
            scale, zero = rtn.grid(w[:, i:i + group], bits)
        q[:, i:i + 1] = rtn.dequantize(rtn.quantize(w[:, i:i + 1], scale, zero, bits), scale, zero)
        e = (w[:, i:i + 1] - q[:, i:i + 1]) / u[i, i]
        w[:, i:] -= e @ u[i:i + 1, i:]
    return q[:, torch.argsort(order)].float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, group", [(4, 32), (3, 64), (4, 128)])
def test_blocked_gptq_equals_the_column_by_column_update(bits, group, act_order):
    torch.manual_seed(2)
    w = torch.randn(24, 128)
    h = gptq.hessian(correlated_inputs(512, 128, 3))
    fast = gptq.gptq(w, h, bits=bits, group=group, act_order=act_order, block=48)  # blocks of whole groups
    slow = gptq_by_column(w, h, bits=bits, group=group, act_order=act_order)
    torch.testing.assert_close(fast.weight(), slow, atol=1e-5, rtol=1e-5)
    assert (fast.g_idx is not None) == act_order
    if act_order:  # each group holds `group` inputs, in decreasing order of activity
        assert torch.equal(torch.bincount(fast.g_idx), torch.full((128 // group,), group))


@pytest.mark.parametrize("bits, group", [(4, 32), (3, 32), (4, 128)])
def test_gptq_output_error_is_below_round_to_nearest(bits, group):
    torch.manual_seed(4)
    w = torch.randn(64, 128)
    white = torch.randn(2048, 128)
    for x, strictly in ((white, False), (correlated_inputs(2048, 128, 5), True)):
        h = gptq.hessian(x)
        ours = gptq.gptq(w, h, bits=bits, group=group, damp=0.01).weight()
        nearest = rtn.dequantize_groups(*rtn.groups(w, bits, group))
        e_gptq, e_rtn = ((w - ours) @ x.T).norm(), ((w - nearest) @ x.T).norm()
        assert e_gptq <= e_rtn * 1.001
        if strictly:
            assert e_gptq < 0.8 * e_rtn, (float(e_gptq), float(e_rtn))


def test_unseen_inputs_are_zeroed_and_shapes_are_checked():
    w = torch.randn(4, 64)
    x = torch.randn(100, 64)
    x[:, 5] = 0
    out = gptq.gptq(w, gptq.hessian(x), bits=4, group=32)
    assert float(out.weight()[:, 5].abs().max()) == 0
    with pytest.raises(ValueError, match="multiple of the group size"):
        gptq.gptq(w, gptq.hessian(x), group=48)
