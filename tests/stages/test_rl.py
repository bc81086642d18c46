"""The rl stage (DPO) on a tiny checkpoint: the first step's loss is log 2 (the policy is its reference), the
implicit reward margin grows, outputs load, runs repeat exactly, resume is exact, and on-policy pairs work."""

from __future__ import annotations

import json
import math
import signal

import pytest

from mmctl import recipe  # noqa: E402
from mmctl.errors import Interrupted, UsageError  # noqa: E402
from mmctl.rl import dpo, grpo  # noqa: E402
from mmctl.stages import dpo as dpo_stage  # noqa: E402
from mmctl.stages import grpo as grpo_stage  # noqa: E402
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
    return recipe.build(dpo_stage.DPORecipe, data, recipe.Source("r", {}, set()))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("tok_s", "mfu")} for r in rows]


def test_dpo_starts_at_log_2_and_widens_the_margin(checkpoint, tmp_path, pairs_file):
    import transformers
    result = dpo_stage.run(config(checkpoint, tmp_path / "a", pairs_file))
    steps = [m for m in metrics(tmp_path / "a") if "loss" in m]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["rewards/margins"] == 0
    assert steps[-1]["rewards/margins"] > 0.05 and steps[-1]["loss"] < math.log(2) - 0.03
    final = result.results["final"]
    assert 0 <= final["val_rewards/accuracies"] <= 1 and final["val_loss"] > 0 and "→" in final["sample"]
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").exists()
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model")
    assert dpo_stage.run(config(checkpoint, tmp_path / "a", pairs_file)).up_to_date
    dpo_stage.run(config(checkpoint, tmp_path / "b", pairs_file))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupt_and_resume_equals_uninterrupted(checkpoint, tmp_path, monkeypatch, pairs_file, method):
    dpo_stage.run(config(checkpoint, tmp_path / "full", pairs_file, method))
    real, calls = dpo.batch_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 5:  # during step 5 of 8 (evaluation's calls come after step 4)
            signal.raise_signal(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(dpo, "batch_loss", interrupting)
    with pytest.raises(Interrupted):
        dpo_stage.run(config(checkpoint, tmp_path / "part", pairs_file, method))
    monkeypatch.setattr(dpo, "batch_loss", real)
    dpo_stage.run(config(checkpoint, tmp_path / "part", pairs_file, method))
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "part" / "model" / "model.safetensors").read_bytes() == full


def test_on_policy_pairs_from_the_starting_model(checkpoint, tmp_path):
    cfg = recipe.build(dpo_stage.DPORecipe, {
        "run": {"out": str(tmp_path / "o"), "device": "cpu"}, "base": str(checkpoint), "method": "full",
        "data": {"sources": [{"kind": "arithmetic", "problems": 16, "samples": 2}], "val_fraction": 0},
        "train": {"steps": 2, "batch_size": 4, "seq_len": 32, "precision": "fp32"}},
        recipe.Source("r", {}, set()))
    result = dpo_stage.run(cfg)
    data = result.results["data"]
    assert data["pairs"] == data["sources[0]"]["pairs"] > 0 and data["sources[0]"]["problems"] == 16


def distinct_characters(completion: str, answer: str) -> float:
    """A reward a random model's completions differ in (so every group has an advantage to follow)."""
    return len(set(completion)) / 10


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": a + b}) + "\n"
                            for a in range(10) for b in range(4)))
    return path


def grpo_config(checkpoint, out, problems, method="full", grpo=None, **train):
    data = {"run": {"out": str(out), "seed": 2, "device": "cpu"}, "base": str(checkpoint), "method": method,
            "algorithm": "grpo", "lora": {"r": 4, "alpha": 8},
            "grpo": {"group_size": 4, "max_completion_tokens": 6, "samples_every": 3, "allow_python_rewards": True,
                     "rewards": [{"name": "numeric"}, {"name": "tests.stages.test_rl:distinct_characters"}],
                     **(grpo or {})},
            "data": {"sources": [{"kind": "jsonl", "path": str(problems)}], "val_fraction": 0.1},
            "optim": {"lr": 1e-2, "warmup_steps": 0},
            "train": {"steps": 8, "batch_size": 16, "micro_batch_size": 8, "seq_len": 48, "precision": "fp32",
                      "log_every": 1, "eval_every": 4, "checkpoint_every": 3, **train},
            "eval": {"sample_tokens": 3}}
    return recipe.build(grpo_stage.GRPORecipe, data, recipe.Source("r", {}, set()))


def test_grpo_logs_its_diagnostics_and_raises_the_reward(checkpoint, tmp_path, problems_file):
    # 12 steps: the reward's last three beat its first three at seeds 0-3 (8 steps: at 2 of them)
    result = grpo_stage.run(grpo_config(checkpoint, tmp_path / "a", problems_file, steps=12))
    steps = [m for m in metrics(tmp_path / "a") if "loss" in m]
    assert steps[0]["loss"] == pytest.approx(0, abs=1e-6)  # μ = 1: ratio 1 and advantages summing to 0
    for key in ("reward", "reward_std", "frac_reward_zero_std", "accuracy", "entropy", "clip_ratio/region",
                "completions/mean_length", "completions/clipped_ratio", "rewards/numeric",
                "rewards/tests.stages.test_rl:distinct_characters"):
        assert key in steps[0], key
    assert steps[0]["clip_ratio/region"] == 0 and steps[0]["completions/mean_length"] <= 6
    assert sum(m["reward"] for m in steps[-3:]) > sum(m["reward"] for m in steps[:3])
    final = result.results["final"]
    assert 0 <= final["val_accuracy"] <= 1 and "→" in final["sample"]
    samples = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 4, 7, 10] and len(samples[0]["completions"]) == 4
    assert grpo_stage.run(grpo_config(checkpoint, tmp_path / "a", problems_file, steps=12)).up_to_date


@pytest.mark.parametrize(("method", "knobs"), [("full", {"num_iterations": 2, "beta": 0.1, "loss_type": "grpo"}),
                                              ("lora", {"beta": 0.1, "loss_type": "dr_grpo"})])
def test_grpo_resume_equals_uninterrupted(checkpoint, tmp_path, monkeypatch, problems_file, method, knobs):
    """Interrupted within a rollout's μ steps, the resumed run trains on the kept rollout and samples afterwards
    exactly what the uninterrupted one sampled."""
    grpo_stage.run(grpo_config(checkpoint, tmp_path / "full", problems_file, method, knobs))
    real, calls = grpo.batch_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 5:  # during step 3 of 8 (two micro-batches a step): the second step on step 2's rollout
            signal.raise_signal(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(grpo, "batch_loss", interrupting)
    with pytest.raises(Interrupted):
        grpo_stage.run(grpo_config(checkpoint, tmp_path / "part", problems_file, method, knobs))
    monkeypatch.setattr(grpo, "batch_loss", real)
    grpo_stage.run(grpo_config(checkpoint, tmp_path / "part", problems_file, method, knobs))
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    for name in ("samples.jsonl", "model/model.safetensors"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert "kl" in metrics(tmp_path / "full")[0]


@pytest.mark.parametrize(("change", "message"), [
    ({"train": {"batch_size": 10}}, "not a whole number of groups"),
    ({"data": {"sources": [{"kind": "jsonl", "path": "x", "pairs": 3}]}}, "sources\\[0\\].pairs: unknown key"),
    ({"grpo": {"rewards": [{"name": "numerical"}]}}, "unknown reward"),
])
def test_grpo_recipe_mistakes_are_named(change, message):
    data = {"base": "m", "algorithm": "grpo", "data": {"sources": [{"kind": "arithmetic", "problems": 10}]},
            "grpo": {"group_size": 4}, "train": {"batch_size": 16}}
    for key, value in change.items():
        data[key] = {**data[key], **value}
    with pytest.raises(UsageError, match=message):
        recipe.build(grpo_stage.GRPORecipe, data, recipe.Source("r", {}, set()))


def test_grpo_refuses_prompts_that_leave_no_room(checkpoint, tmp_path, problems_file):
    with pytest.raises(UsageError, match="longest prompt"):
        grpo_stage.run(grpo_config(checkpoint, tmp_path / "o", problems_file, seq_len=12))


def test_grpo_puts_the_system_prompt_before_problems_without_one(checkpoint, tmp_path, problems_file):
    from mmctl.tokenizer import bpe

    cfg = grpo_config(checkpoint, tmp_path / "o", problems_file, steps=1)
    cfg.data.system_prompt = "Think, then answer."
    (train, val), _ = grpo_stage.problems(cfg, bpe.load(checkpoint))
    assert all(p.prompt[0] == {"role": "system", "content": "Think, then answer."} for p in train + val)
