"""The rl stage (DPO) on a tiny checkpoint: the first step's loss is log 2 (the policy is its reference), the
implicit reward margin grows, outputs load, runs repeat exactly, resume is exact, and on-policy pairs work."""

from __future__ import annotations

import json
import math
import signal

import pytest

torch = pytest.importorskip("torch")

from mmctl import recipe  # noqa: E402
from mmctl.errors import Interrupted  # noqa: E402
from mmctl.stages import rl  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = [{"prompt": f"What is {a} + {b}?", "chosen": str(a + b), "rejected": str(a + b + 1 + a % 3)}
             for a in range(12) for b in range(5)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def config(checkpoint, out, pairs, method="lora", **train):
    data = {"run": {"out": str(out), "seed": 1, "device": "cpu"}, "base": str(checkpoint), "method": method,
            "lora": {"r": 4, "alpha": 8}, "dpo": {"beta": 1.0},
            "data": {"sources": [{"kind": "jsonl", "path": str(pairs)}], "val_fraction": 0.1},
            "optim": {"lr": 1e-2, "warmup_steps": 1},
            "train": {"steps": 8, "batch_size": 8, "seq_len": 32, "precision": "fp32", "log_every": 1,
                      "eval_every": 4, "checkpoint_every": 3, **train},
            "eval": {"sample_tokens": 3}}
    return recipe.build(rl.RLConfig, data, recipe.Source("r", {}, set()))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tok_s", "mfu")} for r in rows]


def test_dpo_starts_at_log_2_and_widens_the_margin(checkpoint, tmp_path, pairs_file):
    transformers = pytest.importorskip("transformers")
    result = rl.run(config(checkpoint, tmp_path / "a", pairs_file))
    steps = [m for m in metrics(tmp_path / "a") if "loss" in m]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["rewards/margins"] == 0
    assert steps[-1]["rewards/margins"] > 0.05 and steps[-1]["loss"] < math.log(2) - 0.03
    final = result.results["final"]
    assert 0 <= final["val_rewards/accuracies"] <= 1 and final["val_loss"] > 0 and "→" in final["sample"]
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").exists()
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    assert rl.run(config(checkpoint, tmp_path / "a", pairs_file)).up_to_date
    rl.run(config(checkpoint, tmp_path / "b", pairs_file))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupt_and_resume_equals_uninterrupted(checkpoint, tmp_path, monkeypatch, pairs_file, method):
    rl.run(config(checkpoint, tmp_path / "full", pairs_file, method))
    real, calls = rl.dpo_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 5:  # during step 5 of 8 (evaluation's calls come after step 4)
            signal.raise_signal(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(rl, "dpo_loss", interrupting)
    with pytest.raises(Interrupted):
        rl.run(config(checkpoint, tmp_path / "part", pairs_file, method))
    monkeypatch.setattr(rl, "dpo_loss", real)
    rl.run(config(checkpoint, tmp_path / "part", pairs_file, method))
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "part" / "model" / "model.safetensors").read_bytes() == full


def test_on_policy_pairs_from_the_starting_model(checkpoint, tmp_path):
    cfg = recipe.build(rl.RLConfig, {
        "run": {"out": str(tmp_path / "o"), "device": "cpu"}, "base": str(checkpoint), "method": "full",
        "data": {"sources": [{"kind": "arithmetic", "problems": 16, "samples": 2}], "val_fraction": 0},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "precision": "fp32"}},
        recipe.Source("r", {}, set()))
    result = rl.run(cfg)
    data = result.results["data"]
    assert data["pairs"] == data["sources[0]"]["pairs"] > 0 and data["sources[0]"]["problems"] == 16
