"""GRPO's pieces against hand computations: group advantages, the three loss aggregations, where clipping bites,
the policy gradient at μ = 1, the KL estimator, and rewards that never break on what a model writes."""

from __future__ import annotations

import math

import pytest
import torch

from mmctl.errors import DataError, UsageError  # noqa: E402
from mmctl.rl import grpo, rewards  # noqa: E402
from mmctl.rl.grpo import GRPOConfig  # noqa: E402
from mmctl.rl.rewards import RewardSpec, Sample  # noqa: E402


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0, 1.0])
    std = math.sqrt(4 * 0.25 / 3)  # group one: mean 0.5, unbiased std over 4
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    # group three: mean 1, deviations (1, −1, 0, 0), unbiased std sqrt(2 / 3)
    expected += [d / (math.sqrt(2 / 3) + 1e-4) for d in (1, -1, 0, 0)]
    assert grpo.advantages(r, 4).tolist() == pytest.approx(expected, abs=1e-6)
    assert grpo.advantages(r, 4, scale=False).tolist() == pytest.approx(
        [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -1, 0, 0])


def batch():
    """Three completions of 3, 1 and 2 tokens (width 3), with ratios away from 1."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0], [-1.2, -0.7, -9.0]])
    old = torch.tensor([[-1.1, -1.5, -0.5], [-0.6, -1.0, -1.0], [-1.0, -0.9, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0, 0.5])
    return logps, old, mask, adv


def hand_token_losses(cfg, logps, old, mask, adv):
    """Each sequence's per-token losses, by the formula, one number at a time."""
    out = []
    for i in range(len(adv)):
        row = []
        for t in range(len(logps[i])):
            if mask[i][t]:
                ratio = math.exp(logps[i][t] - old[i][t])
                clipped = min(max(ratio, 1 - cfg.epsilon_low), 1 + cfg.epsilon_high)
                row.append(-min(ratio * adv[i], clipped * adv[i]))
        out.append(row)
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_each_aggregation_by_hand(loss_type):
    cfg = GRPOConfig(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, max_completion_tokens=5)
    logps, old, mask, adv = batch()
    rows = hand_token_losses(cfg, logps.tolist(), old.tolist(), mask.tolist(), adv.tolist())
    total, count, _ = grpo.loss(cfg, logps, old, adv, mask)
    expected = {"grpo": sum(sum(r) / len(r) for r in rows) / 3,
                "dr_grpo": sum(map(sum, rows)) / (3 * 5),
                "dapo": sum(map(sum, rows)) / 6}[loss_type]
    assert float(total) / count == pytest.approx(expected, rel=1e-6)


def test_aggregation_is_exact_however_the_batch_is_split():
    """The loop divides Σ sums by Σ counts over micro-batches: one batch and its halves give the same loss."""
    logps, old, mask, adv = batch()
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        cfg = GRPOConfig(loss_type=loss_type)
        whole = grpo.loss(cfg, logps, old, adv, mask)
        parts = [grpo.loss(cfg, logps[s], old[s], adv[s], mask[s]) for s in (slice(0, 1), slice(1, 3))]
        assert float(whole[0]) / whole[1] == pytest.approx(
            sum(float(p[0]) for p in parts) / sum(p[1] for p in parts), rel=1e-6)


def test_clipping_bites_exactly_outside_the_band():
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo")
    ratios = torch.tensor([0.7, 0.79, 0.81, 1.0, 1.27, 1.29, 1.6])
    for a in (1.0, -1.0):
        logps = ratios.log().clone().requires_grad_(True)
        total, _, metrics = grpo.loss(cfg, logps[None], torch.zeros(1, 7), torch.tensor([a]), torch.ones(1, 7))
        total.backward()
        # the gradient of −min(ρA, clip(ρ)A) vanishes only where clipping chose the clipped term
        clipped = (ratios > 1.28) if a > 0 else (ratios < 0.8)
        assert (logps.grad == 0).tolist() == clipped.tolist()
        assert float(metrics["clip_ratio/region"][0]) == clipped.sum()
        key = "clip_ratio/high" if a > 0 else "clip_ratio/low"
        assert float(metrics[key][0]) == clipped.sum()


def test_at_one_iteration_the_gradient_is_the_policy_gradient():
    """μ = 1: old log-probs are the current ones detached, so ∇loss = −Σ A_i ∇ log π(o_i) / normaliser."""
    from mmctl.models.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                    num_kv_heads=1, max_position_embeddings=16))
    ids = torch.randint(0, 64, (4, 9))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0],
                         [0, 0, 1, 1, 1, 1, 1, 1]]).float()
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])

    def grads(fn):
        model.zero_grad()
        fn().backward()
        return [p.grad.clone() for p in model.parameters()]

    def logps():
        return grpo.token_logps(model(ids[:, :-1]), ids[:, 1:])

    for loss_type, per_seq in (("grpo", True), ("dapo", False)):
        cfg = GRPOConfig(loss_type=loss_type)

        def ours(cfg=cfg):
            lp = logps()
            total, count, _ = grpo.loss(cfg, lp, lp.detach(), adv, mask)
            return total / count

        def policy_gradient(per_seq=per_seq):
            lp = logps()
            if per_seq:
                return -(adv * (lp * mask).sum(-1) / mask.sum(-1)).mean()
            return -(adv[:, None] * lp * mask).sum() / mask.sum()

        for a, b in zip(grads(ours), grads(policy_gradient), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        lp = logps().detach()
        assert float(grpo.loss(cfg, lp, lp, adv - adv.mean(), torch.ones_like(mask))[0]) == pytest.approx(0, abs=1e-6)


def test_kl_is_k3_and_only_with_a_reference():
    cfg = GRPOConfig(beta=0.5, loss_type="dapo", kl_bias_correction=False)
    logps, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    total, count, metrics = grpo.loss(cfg, logps, logps, torch.tensor([0.0]), torch.ones(1, 2), ref)
    k3 = [math.exp(q) - q - 1 for q in (-0.5, 1.0)]
    assert float(metrics["kl"][0]) / metrics["kl"][1] == pytest.approx(sum(k3) / 2)
    assert float(total) / count == pytest.approx(0.5 * sum(k3) / 2)  # advantage 0: the KL term alone
    assert "kl" not in grpo.loss(cfg, logps, logps, torch.tensor([0.0]), torch.ones(1, 2))[2]
    old = torch.tensor([[-1.2, -1.9]])  # the correction weighs each token's k3 by its ratio π / π_old
    corrected = grpo.loss(GRPOConfig(beta=0.5, loss_type="dapo"), logps, old, torch.tensor([0.0]), torch.ones(1, 2),
                          ref)
    weighted = [k * math.exp(r) for k, r in zip(k3, (0.2, -0.1), strict=True)]
    assert float(corrected[2]["kl"][0]) / 2 == pytest.approx(sum(weighted) / 2)


def score(fn, completion, answer="42", tokens=4):
    return fn(Sample(completion, answer, tokens, 16))


@pytest.mark.parametrize(("completion", "right"), [
    ("42", 1), ("The answer is 42.", 1), ("42.0", 1), ("first 7 then 42", 1), ("<think>41? no</think> <answer>42"
     "</answer>", 1), ("<answer>42</answer> but 43", 1), ("so #### 42", 1), ("#### 42\nthen 7", 1), ("-42", 0),
    ("4 2", 0), ("", 0), ("<answer></answer>42", 0), ("<answer>", 0), ("####", 0), ("42e0", 0), ("420", 0),
    ("\x00\ufffd" * 50, 0), ("9" * 5000, 0), ("<think><answer>42</answer>", 1)])
def test_numeric_reward_on_hostile_completions(completion, right):
    assert score(rewards.numeric, completion) == right


def test_format_exact_and_length_rewards():
    assert score(rewards.think_format, "<think>6 × 7</think>\n<answer>42</answer>") == 1
    for bad in ("<think>x</think>", "<answer>42</answer>", "<think>x</think> <answer>42</answer> more",
                "pre <think>x</think><answer>42</answer>", "<think>x<answer>42</answer>", ""):
        assert score(rewards.think_format, bad) == 0
    assert score(rewards.hashes_format, "6 × 7 = 42\n#### 42") == 1
    assert score(rewards.hashes_format, "#### 42 apples") == 0 and score(rewards.hashes_format, "42") == 0
    assert score(rewards.exact, " Paris. ", "Paris") == 1 and score(rewards.exact, "paris", "Paris") == 0
    assert score(rewards.exact, "<answer>1,000</answer>", "1000") == 1
    assert score(rewards.length, "x", tokens=4) == -0.25


def test_python_rewards_need_opt_in_and_fail_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(completion, answer):\n    return 1.0 / (1 + len(completion))\n"
        "def broken(completion, answer):\n    return {}['x']\n"
        "def nan(completion, answer):\n    return float('nan')\n"
        "def text(completion, answer):\n    return '1'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match="allow_python_rewards"):
        rewards.resolve([RewardSpec("my_rewards:short")], allow_python=False)
    [(name, weight, fn)] = rewards.resolve([RewardSpec("my_rewards:short", 2.0)], allow_python=True)
    assert (name, weight, score(fn, "abc")) == ("my_rewards:short", 2.0, 0.25)
    for bad, message in (("broken", "KeyError"), ("nan", "nan"), ("text", "'1'")):
        [(_, _, fn)] = rewards.resolve([RewardSpec(f"my_rewards:{bad}")], allow_python=True)
        with pytest.raises(DataError, match=message):
            score(fn, "abc")
    with pytest.raises(UsageError, match="cannot import"):
        rewards.resolve([RewardSpec("no_such_module_here:f")], allow_python=True)
    assert RewardSpec("numerc").check() and not RewardSpec("numeric").check()


@pytest.mark.parametrize(("loss_type", "beta", "corrected"), [("grpo", 0.0, True), ("dr_grpo", 0.04, True),
                                                            ("dapo", 0.1, True), ("grpo", 0.1, False)])
def test_equal_to_trls_grpo_trainer(checkpoint, tmp_path, loss_type, beta, corrected):
    """The same model, rows, advantages, old and reference log-probs: TRL's GRPOTrainer._compute_loss and mmctl's
    batch loss agree in value and in gradient (prompts of one length: TRL left-pads, mmctl right-pads)."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from mmctl import checkpoints

    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    args = TRLConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, num_generations=4,
                     max_completion_length=5, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
                     use_bias_correction_kl=corrected, report_to=[], use_cpu=True, bf16=False)
    trainer = GRPOTrainer(model=theirs, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_list([{"prompt": "What is 1 + 2?"}] * 4),
                          processing_class=transformers.AutoTokenizer.from_pretrained(checkpoint))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 512, (4, 7), generator=g)
    completion = torch.randint(0, 512, (4, 5), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([1.2, -0.4, 0.3, -1.1])
    ours = checkpoints.load_lm(checkpoint)
    ids = torch.cat([prompt, completion], 1)
    with torch.no_grad():  # old and reference log-probs a little away from the model's, so ratios clip and KL > 0
        now = grpo.token_logps(ours(ids[:, :-1]), ids[:, 1:])[:, 6:]
    old = now + torch.randn(now.shape, generator=g) * 0.3
    ref = now + torch.randn(now.shape, generator=g) * 0.3
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": completion_mask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    trl_loss = trainer._compute_loss(theirs, inputs)
    trl_loss.backward()

    cfg = GRPOConfig(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28, max_completion_tokens=5,
                     kl_bias_correction=corrected)
    pad = torch.zeros(4, 6)
    mask = torch.cat([pad, completion_mask.float()], 1)  # over the targets ids[:, 1:]: the completion from 6 on
    batch = {"ids": ids, "mask": mask, "adv": adv, "tokens": int(ids.numel()), "stats": {},
             "old_logps": torch.cat([pad, old], 1), "ref_logps": torch.cat([pad, ref], 1)}
    out = grpo.batch_loss(cfg, ours, batch)
    (out.sum / out.count).backward()
    assert float(out.sum / out.count) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_grads[name].grad, rtol=1e-4, atol=1e-6)


def test_problems_in_each_format_and_bad_ones_named(tmp_path):
    from mmctl.data.rl import Problem, read_problems

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "What is 2 + 2?", "answer": 4}\n'
                    '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], '
                    '"answer": "hello"}\n'
                    '{"question": "Tom has 3 apples and buys 4.", "answer": "3 + 4 = 7 apples.\\n#### 7"}\n')
    assert read_problems(path) == [
        Problem([{"role": "user", "content": "What is 2 + 2?"}], "4"),
        Problem([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}], "hello"),
        Problem([{"role": "user", "content": "Tom has 3 apples and buys 4."}], "7")]
    for bad, message in (('{"prompt": "x"}', "not a problem"), ('{"prompt": "x", "answer": true}', "not a problem"),
                         ('{"prompt": "x", "answer": "so #### "}', "empty after"), ('{"answer": 3}', "no prompt"),
                         ('{"prompt": [{"role": "assistant", "content": "x"}], "answer": 3}', "ends with")):
        path.write_text(bad + "\n")
        with pytest.raises(DataError, match=message):
            read_problems(path)
