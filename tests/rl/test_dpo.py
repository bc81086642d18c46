"""DPO against its definition (worked examples from the papers' formulas) and against TRL's DPOTrainer on the
same model, reference and pairs; the preference data's masks; on-policy pairs whose answers are verified."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmctl import recipe  # noqa: E402
from mmctl.data import rl as rl_data  # noqa: E402
from mmctl.errors import DataError  # noqa: E402
from mmctl.rl import dpo  # noqa: E402
from mmctl.rl import pairs as rl_pairs  # noqa: E402

T = torch.tensor


def cfg(**fields) -> dpo.DPOConfig:
    return recipe.build(dpo.DPOConfig, fields, recipe.Source("r", {}, set()))


def test_losses_equal_the_papers_formulas_on_a_worked_example():
    # log π: chosen −1, rejected −3; log π_ref: −2 for both → Δ = 1 − (−1) = 2; β = 0.1
    args = T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0])
    loss, metrics = dpo.losses(cfg(beta=0.1), *args)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)))  # −log σ(βΔ)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.1)
    assert metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert metrics["rewards/margins"].item() == pytest.approx(0.2) and metrics["rewards/accuracies"].item() == 1
    smoothed, _ = dpo.losses(cfg(beta=0.1, label_smoothing=0.1), *args)  # conservative DPO
    assert smoothed.item() == pytest.approx(0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2)))
    ipo, _ = dpo.losses(cfg(beta=0.1, loss="ipo"), *args, T([2.0]), T([4.0]))  # lengths 2 and 4
    assert ipo.item() == pytest.approx((1 / 2 - (-1) / 4 - 1 / (2 * 0.1)) ** 2)


def test_label_smoothing_is_for_the_sigmoid_loss_only():
    from mmctl.errors import UsageError

    with pytest.raises(UsageError, match="label_smoothing"):
        cfg(loss="ipo", label_smoothing=0.1)


PAIRS = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
          "chosen": [{"role": "assistant", "content": str(a + b)}],
          "rejected": [{"role": "assistant", "content": str(a + b + d)}]}
         for a, b, d in [(1, 2, 1), (30, 4, 10), (12, 13, -2), (50, 7, 3)]]


@pytest.mark.parametrize(("loss", "rpo_alpha"), [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.5)])
def test_equal_to_trls_dpo_trainer(checkpoint, tmp_path, loss, rpo_alpha):
    """The same policy, reference and four pairs: TRL's first logged step and mmctl's loss and metrics agree (RPO:
    TRL's sigmoid and sft losses weighted 1 and α)."""
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mmctl import checkpoints

    policy = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():  # a reference the policy has moved away from
        g = torch.Generator().manual_seed(0)
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    reference.save_pretrained(tmp_path / "ref")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=1, learning_rate=0.0,
                     beta=0.1, loss_type=[loss, "sft"] if rpo_alpha else [loss],
                     loss_weights=[1.0, rpo_alpha] if rpo_alpha else None, logging_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no",
                     max_length=64, bf16=False)  # TRL would otherwise autocast to bf16
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok)
    trainer.train()
    theirs = trainer.state.log_history[0]

    ours_policy, ours_tok = checkpoints.load(checkpoint)
    ours_ref = checkpoints.load_lm(tmp_path / "ref")
    pairs = [rl_data.pair(p, "test") for p in PAIRS]
    rows = rl_pairs.rows(pairs, ours_tok, ours_ref, 63, ours_tok.eos_id, "fp32", "cpu")
    with torch.no_grad():
        out = dpo.batch_loss(dpo.DPOConfig(beta=0.1, loss=loss, rpo_alpha=rpo_alpha), ours_policy.eval(),
                             rl_pairs.tensors(rows, [0, 1, 2, 3], "cpu"))
    assert float(out.sum) / out.count == pytest.approx(theirs["loss"], abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        total, weight = out.metrics[name]
        assert float(total) / weight == pytest.approx(theirs[name], abs=1e-4), name


def test_the_mask_covers_the_completion_and_its_end_of_turn(checkpoint):
    from mmctl.tokenizer import bpe

    tok = bpe.load(checkpoint)
    chosen, rejected = rl_data.encode(rl_data.pair(PAIRS[1], "test"), tok)
    for example, text in ((chosen, "34"), (rejected, "44")):
        trained = [t for t, m in zip(example.ids, example.mask, strict=True) if m]
        assert tok.decode(trained) == f"{text}<|end|>"
        assert tok.decode(example.ids).startswith("<|user|>What is 30 + 4?<|end|><|assistant|>")


@pytest.mark.parametrize(("record", "fragment"), [
    ({"prompt": "Hi", "chosen": "a"}, "not a preference pair"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "neither text nor a non-empty list"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "ends with an assistant message"),
    ({"messages": [{"role": "robot", "content": "Hi"}], "chosen": "a", "rejected": "b"}, "messages[0]"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen is neither"),
    ({"prompt": "Hi", "chosen": "a", "rejected": ["b", "c"]}, "rejected is neither"),
])
def test_malformed_pairs_name_file_and_line(tmp_path, record, fragment):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"pairs.jsonl:2: .*{fragment.replace('[', '.').replace(']', '.')}"):
        rl_data.read_pairs(path)


def test_on_policy_pairs_are_verified(checkpoint):
    from mmctl import checkpoints
    from mmctl.data.synthetic import held_out
    from mmctl.evals.extract import exact_match, extract
    from mmctl.rl.pairs import arithmetic_pairs

    model, tok = checkpoints.load(checkpoint)
    pairs, stats = arithmetic_pairs(model, tok, 12, seed=0, samples=3)
    assert stats["problems"] == 12 and stats["pairs"] == len(pairs) > 0
    again, _ = arithmetic_pairs(model, tok, 12, seed=0, samples=3)
    assert again == pairs  # a function of the seed and the model
    for p in pairs:
        question = p.prompt[0]["content"]
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        answer = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert not held_out(question)
        assert exact_match(extract(p.chosen, "last_number"), answer)
        assert not exact_match(extract(p.rejected, "last_number"), answer)


def test_pairs_from_a_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(PAIRS).save_to_disk(tmp_path / "pairs")
    assert rl_data.read_pairs(tmp_path / "pairs", "train") == [rl_data.pair(p, "x") for p in PAIRS]
    with pytest.raises(DataError, match=r"no split 'test'"):
        datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(tmp_path / "dict")
        rl_data.read_pairs(tmp_path / "dict", "test")
