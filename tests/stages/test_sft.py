"""The sft stage on a tiny checkpoint: full and LoRA fine-tuning write a merged chat model that transformers
loads, LoRA also a PEFT adapter that PEFT loads with the same logits, QLoRA an adapter for its dequantized base,
runs repeat exactly, and resume is exact."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from mmctl import recipe  # noqa: E402
from mmctl.errors import Interrupted  # noqa: E402
from mmctl.stages import sft  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def config(checkpoint, out, method="full", **train):
    data = {"run": {"out": str(out), "seed": 1, "device": "cpu"}, "base": str(checkpoint), "method": method,
            "lora": {"r": 4, "alpha": 8}, "data": {"sources": [{"kind": "arithmetic", "conversations": 200}],
                                                   "val_fraction": 0.1},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {"steps": 6, "batch_size": 4, "seq_len": 48, "precision": "fp32", "log_every": 1,
                      "eval_every": 3, "checkpoint_every": 2, **train},
            "eval": {"sample_tokens": 4}}
    return recipe.build(sft.SFTRecipe, data, recipe.Source("r", {}, set()))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tok_s", "mfu")} for r in rows]


def test_full_fine_tuning(checkpoint, tmp_path):
    import transformers
    result = sft.run(config(checkpoint, tmp_path / "a"))
    final = result.results["final"]
    assert final["step"] == 6 and final["val_loss"] > 0 and "→" in final["sample"]
    assert result.results["params"]["trainable_fraction"] == 1.0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    assert model.num_parameters() == result.results["params"]["total"]
    from mmctl.checkpoints import is_chat_model

    assert is_chat_model(tmp_path / "a" / "model") and not is_chat_model(checkpoint)
    assert sft.run(config(checkpoint, tmp_path / "a")).up_to_date
    sft.run(config(checkpoint, tmp_path / "b"))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_lora_writes_a_peft_adapter_and_a_merged_model(checkpoint, tmp_path, monkeypatch):
    import peft
    import transformers
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
    elsewhere = tmp_path / "elsewhere"  # the adapter names its base so that PEFT finds it from any directory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "l" / "adapter", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (auto(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() <= 1e-4


def test_lora_with_trainable_tokens_moves_those_rows_only(checkpoint, tmp_path):
    """`lora.trainable_tokens`: the chat markers' and a digit's embedding rows train beside the adapters; the
    merged model changes those rows and no other, and PEFT's load of the adapter equals the merged model."""
    import peft
    import transformers

    from mmctl import checkpoints
    from mmctl.errors import UsageError
    from mmctl.models import lora

    cfg = config(checkpoint, tmp_path / "t", method="lora")
    cfg.lora.trainable_tokens = ["<|user|>", "<|assistant|>", "<|end|>", "7"]
    sft.run(cfg)
    tok = checkpoints.load(checkpoint)[1]
    rows = lora.token_ids(tok, cfg.lora.trainable_tokens)
    before = checkpoints.load_lm(checkpoint).model.embed_tokens.weight
    after = checkpoints.load_lm(tmp_path / "t" / "model").model.embed_tokens.weight
    changed = (before != after).any(1).nonzero().flatten().tolist()
    assert changed == rows and len(rows) == 4
    ids = torch.tensor([rows + [5, 9, 11]])
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "t" / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() <= 1e-4
    bad = config(checkpoint, tmp_path / "u", method="lora")
    bad.lora.trainable_tokens = ["so far away"]
    with pytest.raises(UsageError, match="trainable_tokens: 'so far away' is"):
        sft.run(bad)


def test_qlora_merges_its_adapter_into_the_dequantized_base(checkpoint, tmp_path):
    pytest.importorskip("bitsandbytes")
    from mmctl import checkpoints
    from mmctl.models import lora
    from mmctl.quant import bnb

    result = sft.run(config(checkpoint, tmp_path / "q", method="qlora"))
    assert result.results["method"] == "qlora" and 0 < result.results["params"]["trainable_fraction"] < 0.5
    full = sft.run(config(checkpoint, tmp_path / "f", steps=1)).results["params"]["total"]
    assert result.results["params"]["total"] == full + result.results["params"]["trainable"]  # base + adapters
    base = checkpoints.load_lm(checkpoint)
    bnb.to_4bit(base, bnb.QLoRAConfig())  # the base the adapters were trained on, as the recipe quantized it
    lora.load_adapter(bnb.to_dense(base), tmp_path / "q" / "adapter")
    merged = checkpoints.load_lm(tmp_path / "q" / "model")
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (base(ids) - merged(ids)).abs().max() <= 1e-4
        assert (merged(ids) - checkpoints.load_lm(checkpoint)(ids)).abs().max() > 1e-3


def test_qlora_without_bitsandbytes_says_how_to_install_it(checkpoint, tmp_path, monkeypatch):
    import sys

    from mmctl.errors import UsageError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when it is absent
    with pytest.raises(UsageError, match=r"pip install 'mmctl\[quant\]'"):
        sft.run(config(checkpoint, tmp_path / "q", method="qlora"))
    assert not (tmp_path / "q" / "checkpoints").exists()


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "lora-tokens"])
def test_interrupt_and_resume_equals_uninterrupted(checkpoint, tmp_path, monkeypatch, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from mmctl.train import loss

    def make(out):
        cfg = config(checkpoint, out, method.removesuffix("-tokens"))
        cfg.lora.trainable_tokens = ["<|user|>", "<|assistant|>", "7"] if method.endswith("-tokens") else []
        return cfg

    sft.run(make(tmp_path / "full"))
    real = loss.token_loss
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        if sum(calls) == 4:  # during step 4 of 6 (one training call per step; evaluation's run without grad)
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss, "token_loss", interrupting)
    with pytest.raises(Interrupted):
        sft.run(make(tmp_path / "part"))
    monkeypatch.setattr(loss, "token_loss", real)
    sft.run(make(tmp_path / "part"))
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "part" / "model" / "model.safetensors").read_bytes() == full


def test_inspect_shows_the_rows_the_first_step_trains_on(checkpoint, tmp_path, monkeypatch):
    import subprocess
    import sys

    import yaml

    cfg = recipe.to_dict(config(checkpoint, tmp_path / "i"), "sft")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    run = [sys.executable, "-m", "mmctl", "sft", str(tmp_path / "r.yaml"), "--inspect", "--rows", "4"]
    out = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert not (tmp_path / "i").exists()  # nothing trained, nothing written
    for row in shown["rows"]:
        assert "".join(t["text"] for t in row["tokens"]).startswith("<|user|>What is")
        assert len(row["tokens"]) == shown["data"]["tokens_per_row"] == 49
    assert 0 < shown["data"]["trained_fraction"] < 1

    seen, real = [], sft._tensors
    monkeypatch.setattr(sft, "_tensors", lambda rows, picks, *rest: seen.append(picks) or real(rows, picks, *rest))
    sft.run(config(checkpoint, tmp_path / "t", steps=1))
    assert [row["row"] for row in shown["rows"]] == seen[0]

    plain = subprocess.run(run, capture_output=True, text=True, timeout=120)  # off a terminal: ⟦trained⟧
    assert plain.returncode == 0 and "<|assistant|>⟦" in plain.stderr and "conversations per row" in plain.stderr


def test_a_datasets_directory_is_a_source(checkpoint, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                          {"role": "assistant", "content": str(a + 1)}]} for a in range(30)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "chats")
    cfg = config(checkpoint, tmp_path / "d", steps=2)
    cfg.data.sources = [sft.ChatSource(kind="datasets", path=str(tmp_path / "chats"))]
    result = sft.run(cfg)
    assert result.results["data"]["conversations"] == 30
    rows[3]["messages"][0]["role"] = "robot"
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "bad")
    from mmctl.data.sft import read_conversations
    from mmctl.errors import DataError

    with pytest.raises(DataError, match=r"bad\[train\]\[3\]: messages\[0\]"):
        read_conversations(tmp_path / "bad", "train")


def test_epochs_count_the_steps_from_the_rows(checkpoint, tmp_path):
    import math

    result = sft.run(config(checkpoint, tmp_path / "e", epochs=0.5))
    rows = result.results["data"]["rows"]
    assert result.results["final"]["step"] == math.ceil(0.5 * rows / 4)
