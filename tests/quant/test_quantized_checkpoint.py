"""A whole model quantized (round-to-nearest int8 and int4, GPTQ 3-bit with act-order): the linears become
QuantLinears holding integer codes, the lm_head stays dense, and the checkpoint dir reloads to identical logits
(integer tensors in their own dtypes, `quantization_config` in config.json)."""

from __future__ import annotations

import json

import pytest
import torch

from mmctl import checkpoints  # noqa: E402
from mmctl.errors import DataError  # noqa: E402
from mmctl.quant import linear  # noqa: E402


@pytest.mark.parametrize("method, bits, group, act_order", [("rtn", 8, None, False), ("rtn", 4, 32, False),
                                                            ("gptq", 4, 32, False), ("gptq", 3, 32, True)])
def test_a_quantized_checkpoint_reloads_to_identical_logits(checkpoint, tmp_path, method, bits, group, act_order):
    model = checkpoints.load_lm(checkpoint)
    dense = checkpoints.load_lm(checkpoint)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 32))
    hessians = linear.calibration_hessians(model, [ids[:2], ids[2:]]) if method == "gptq" else None
    quantized = linear.quantize_model(model, method, bits, group, hessians=hessians, act_order=act_order)
    layers = [m for m in model.modules() if isinstance(m, linear.QuantLinear)]
    assert len(layers) == 2 * 7 and isinstance(model.lm_head, torch.nn.Linear)  # 7 linears per block, 2 blocks
    out = checkpoints.save(model, tmp_path / "q", None, quantization=quantized)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["method"], config["bits"], config["desc_act"]) == (method, bits, act_order)
    back = checkpoints.load_lm(out)
    with torch.no_grad():
        ours, again, reference = model(ids), back(ids), dense(ids)
    assert torch.equal(ours, again)
    assert 0 < float((ours - reference).abs().max()) < 1.0  # quantized, and close
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and q.shape[1] == 128 * bits // 8


def test_quantized_checkpoint_mistakes_are_named(checkpoint, tmp_path):
    model = checkpoints.load_lm(checkpoint)
    config = linear.quantize_model(model, "rtn", 4, 32)
    out = checkpoints.save(model, tmp_path / "q", None, quantization=config)
    config = json.loads((out / "config.json").read_text())
    for change, message in (({"quant_method": "awq"}, "not one mmctl reads"), ({"bits": 5}, "bits 2, 3, 4 or 8"),
                            ({"group_size": None}, "group_size"), ({"group_size": 64}, "shape")):
        (out / "config.json").write_text(json.dumps({**config, "quantization_config": {
            **config["quantization_config"], **change}}))
        with pytest.raises(DataError, match=message):
            checkpoints.load_lm(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "quantization_config"}))
    with pytest.raises(DataError, match="unexpected tensor"):  # a dense config over quantized tensors
        checkpoints.load_lm(out)


def test_an_nf4_checkpoint_loads_in_mmctl_and_transformers_to_the_same_logits(checkpoint, tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers

    from mmctl.quant import bnb

    model = checkpoints.load_lm(checkpoint)
    nf4 = bnb.QLoRAConfig("nf4", double_quant=True)
    bnb.to_4bit(model, nf4)
    config = bnb.checkpoint_config(nf4, ("lm_head",))
    out = checkpoints.save(model, tmp_path / "nf4", None, quantization=config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    back = checkpoints.load_lm(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    for m in theirs.modules():  # transformers' layers take the same exact path as mmctl's (see quant/bnb.py)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(back(ids), ours, atol=0, rtol=0)
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=1e-5)
        # transformers' default on a CPU with AVX512-BF16: the fused kernel, rounding through bf16 (docs/quantize.md)
        default = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")(ids).logits
        torch.testing.assert_close(default, ours, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_an_int8_bnb_checkpoint_loads_in_mmctl_and_transformers_to_the_same_logits(checkpoint, tmp_path, threshold):
    pytest.importorskip("bitsandbytes")
    import transformers

    from mmctl.quant import bnb

    model = checkpoints.load_lm(checkpoint)
    dense = checkpoints.load_lm(checkpoint)
    bnb.to_int8(model, threshold)
    config = bnb.checkpoint_config(None, ("lm_head",), threshold)
    out = checkpoints.save(model, tmp_path / "int8", None, quantization=config)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    back = checkpoints.load_lm(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    assert type(back.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    assert back.model.layers[0].mlp.down_proj.state.threshold == threshold
    with torch.no_grad():
        ours = model(ids)
        torch.testing.assert_close(back(ids), ours, atol=0, rtol=0)
        torch.testing.assert_close(theirs(ids).logits, ours, atol=1e-5, rtol=1e-5)
        # transformers' default on a CPU with AVX512-BF16: the fused kernel, rounding through bf16 (docs/quantize.md)
        default = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")(ids).logits
        torch.testing.assert_close(default, ours, atol=0.1, rtol=0.05)
        # int8 rows with absmax scales: close to the dense model, not equal to it
        error = (ours - dense(ids)).abs().max().item()
        assert 0 < error < 0.05 * dense(ids).abs().max().item()
