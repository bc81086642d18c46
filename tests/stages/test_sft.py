"""The sft stage on a tiny checkpoint: full and LoRA fine-tuning write a merged chat model that transformers
loads, LoRA also a PEFT adapter that PEFT loads with the same logits, runs repeat exactly, and resume is exact."""

from __future__ import annotations

import json
import signal

import pytest

torch = pytest.importorskip("torch")

from mmctl import recipe  # noqa: E402
from mmctl.errors import Interrupted  # noqa: E402
from mmctl.stages import sft  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(checkpoint, out, method="full", **train):
    data = {"run": {"out": str(out), "seed": 1, "device": "cpu"}, "base": str(checkpoint), "method": method,
            "lora": {"r": 4, "alpha": 8}, "data": {"sources": [{"kind": "arithmetic", "conversations": 200}],
                                                   "val_fraction": 0.1},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"steps": 6, "batch_size": 4, "seq_len": 48, "precision": "fp32", "log_every": 1,
                      "eval_every": 3, "checkpoint_every": 2, **train},
            "eval": {"sample_tokens": 4}}
    return recipe.build(sft.SFTConfig, data, recipe.Source("r", {}, set()))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tok_s", "mfu")} for r in rows]


def test_full_fine_tuning(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    result = sft.run(config(checkpoint, tmp_path / "a"))
    final = result.results["final"]
    assert final["step"] == 6 and final["val_loss"] > 0 and "→" in final["sample"]
    assert result.results["params"]["trainable_fraction"] == 1.0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    assert model.num_parameters() == result.results["params"]["total"]
    from mmctl.models.transformer import is_chat_model

    assert is_chat_model(tmp_path / "a" / "model") and not is_chat_model(checkpoint)
    assert sft.run(config(checkpoint, tmp_path / "a")).up_to_date
    sft.run(config(checkpoint, tmp_path / "b"))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_lora_writes_a_peft_adapter_and_a_merged_model(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    result = sft.run(config(checkpoint, tmp_path / "l", method="lora"))
    assert 0 < result.results["params"]["trainable_fraction"] < 0.5
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "l" / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "l" / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() <= 1e-4
        plain = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)  # PEFT wrapped base
        assert (merged(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max() > 1e-4  # it trained
    saved = json.loads((tmp_path / "l" / "checkpoints" / "step-000006" / "state.json").read_text())
    assert "frozen" in saved["extra"]["fingerprint"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupt_and_resume_equals_uninterrupted(checkpoint, tmp_path, monkeypatch, method):
    sft.run(config(checkpoint, tmp_path / "full", method))
    real = torch.nn.functional.cross_entropy
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # during step 4 of 6 (one call per step; evaluation's come after step 3)
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", interrupting)
    with pytest.raises(Interrupted):
        sft.run(config(checkpoint, tmp_path / "part", method))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", real)
    sft.run(config(checkpoint, tmp_path / "part", method))
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "part" / "model" / "model.safetensors").read_bytes() == full
