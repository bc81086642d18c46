"""GRPO's rollouts: a group of sampled completions per problem from the current policy, scored by the rewards,
turned into training rows — with the statistics that tell a learning run from a stuck one.

Every completion is sampled through `mmctl/generate.py` (batched, KV cache) from the prompt rendered by the
model's chat template; its row is prompt + completion (the end-of-turn token included), right-padded, the
mask on the completion's tokens. The sampling seed is the caller's: a rollout is a function of (weights, seed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmctl.console import console
from mmctl.data.rl import Problem
from mmctl.rl.grpo import GRPOConfig, advantages, token_logps
from mmctl.rl.rewards import Sample

Reward = tuple[str, float, Callable[[Sample], float]]  # (name, weight, function), from rewards.resolve


@dataclass
class Rollout:
    ids: torch.Tensor  # (N, T) prompt + completion, right-padded; N = problems × group_size
    mask: torch.Tensor  # (N, T − 1) 1 where the next token is a completion's
    advantages: torch.Tensor  # (N,)
    tokens: list[int]  # each row's real tokens
    stats: dict[str, tuple[float, float]]  # diagnostics as (sum, weight), the loop's metric form
    samples: list[dict]  # the first problems' groups, readable, for samples.jsonl
    old_logps: torch.Tensor | None = None  # (N, T − 1) under the policy that sampled (kept when μ > 1)
    ref_logps: torch.Tensor | None = None  # (N, T − 1) under the reference (when beta > 0)


def complete(model, tok, problems: list[Problem], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, repeat: int = 1, batch_size: int = 64) -> list[tuple]:
    """(prompt ids, completion ids, text, finished) for each problem, `repeat` times in a row, in eval mode."""
    from mmctl.data.chat import prompt_ids, stop_ids
    from mmctl.generate import SamplingConfig, completion_text, generate

    prompts = [prompt_ids(p.prompt, tok) for p in problems for _ in range(repeat)]
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed * 1_000_003 + start)
        for prompt, c in zip(chunk, generate(model, chunk, sampling, stop_token_ids=stop_ids(tok)).completions,
                             strict=True):
            out.append((prompt, c.ids, completion_text(tok, c), c.finish_reason == "stop"))
    model.train(was_training)
    return out


def score(done: list[tuple], problems: list[Problem], repeat: int, rewards: list[Reward], correct, max_tokens: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed reward (N,), each reward (N, R), correct (N,)) of `complete`'s output."""
    scored, right = [], []
    for i, (_, ids, text, _) in enumerate(done):
        s = Sample(text, problems[i // repeat].answer, len(ids), max_tokens)
        scored.append([fn(s) for _, _, fn in rewards])
        right.append(correct(s))
    each = torch.tensor(scored, dtype=torch.float32).view(len(done), len(rewards))
    weights = torch.tensor([w for _, w, _ in rewards], dtype=torch.float32)
    return each @ weights, each, torch.tensor(right, dtype=torch.float32)


def sample(model, tok, problems: list[Problem], cfg: GRPOConfig, rewards: list[Reward], correct, seed: int,
           pad_id: int, show: int = 2) -> Rollout:
    """Sample `cfg.group_size` completions per problem, score them, and lay them out as training rows."""
    G = cfg.group_size
    done = complete(model, tok, problems, cfg.max_completion_tokens, cfg.temperature, cfg.top_p, seed, repeat=G)
    total, each, right = score(done, problems, G, rewards, correct, cfg.max_completion_tokens)
    adv = advantages(total, G, cfg.scale_rewards)

    rows = [prompt + ids for prompt, ids, _, _ in done]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1)
    for i, (prompt, *_) in enumerate(done):
        ids[i, :len(rows[i])] = torch.tensor(rows[i])
        mask[i, len(prompt) - 1:len(rows[i]) - 1] = 1  # targets: the completion's tokens
    lengths = torch.tensor([len(c) for _, c, _, _ in done], dtype=torch.float32)
    group_std = total.view(-1, G).std(dim=1)
    n, groups, n_right = float(len(done)), float(len(problems)), float(right.sum())
    stats = {"reward": (float(total.sum()), n), "reward_std": (float(group_std.sum()), groups),
             "frac_reward_zero_std": (float((group_std < 1e-6).sum()), groups), "accuracy": (n_right, n),
             **{f"rewards/{name}": (float(each[:, j].sum()), n) for j, (name, _, _) in enumerate(rewards)},
             "completions/mean_length": (float(lengths.sum()), n),
             "completions/length_correct": (float((lengths * right).sum()), n_right),
             "completions/length_incorrect": (float((lengths * (1 - right)).sum()), n - n_right),
             "completions/clipped_ratio": (float(sum(not finished for *_, finished in done)), n)}
    samples = [{"prompt": problems[p].prompt[-1]["content"], "answer": problems[p].answer,
                "completions": [{"text": done[i][2], "reward": round(float(total[i]), 4),
                                 "advantage": round(float(adv[i]), 4), "correct": bool(right[i])}
                                for i in range(p * G, (p + 1) * G)]}
               for p in range(min(show, len(problems)))]
    return Rollout(ids, mask, adv, [len(r) for r in rows], stats, samples)


TENSORS = ("ids", "mask", "advantages", "old_logps", "ref_logps")


def save(r: Rollout, directory: Path, rank: int, step: int, keep: int) -> None:
    """Keep a rollout that serves μ steps on disk (safetensors, atomically; this rank's newest `keep`), so that a
    run resumed within those steps trains on it rather than on a fresh sample."""
    import json

    from mmctl.artifacts import save_tensors

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{rank}-step{step:09d}.safetensors"
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    save_tensors({k: getattr(r, k) for k in TENSORS if getattr(r, k) is not None}, tmp,
                 {"rollout": json.dumps({"tokens": r.tokens, "stats": r.stats, "samples": r.samples})})
    os.replace(tmp, path)
    for old in sorted(directory.glob(f"rank{rank}-step*.safetensors"))[:-keep]:
        old.unlink()


def load(directory: Path, rank: int, step: int) -> Rollout | None:
    """The rollout `save` kept for this rank and step, or None when it is not there or not whole (truncated,
    tampered, of the wrong shapes: a warning says so, and the caller samples afresh)."""
    import json

    from safetensors import safe_open

    path = directory / f"rank{rank}-step{step:09d}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            extra = json.loads(f.metadata()["rollout"])
        r = Rollout(**{k: tensors.get(k) for k in TENSORS}, tokens=extra["tokens"], stats=extra["stats"],
                    samples=extra["samples"])
        r.stats = {k: tuple(v) for k, v in r.stats.items()}
        problem = _shape_problem(r, set(tensors) - set(TENSORS))
    except Exception as e:  # safetensors and json raise several types for a damaged file
        problem = f"unreadable ({type(e).__name__})"
    if problem:
        console.print(f"[yellow]warning:[/yellow] {path}: {problem}; sampling that rollout afresh")
        return None
    return r


def _shape_problem(r: Rollout, unknown: set) -> str | None:
    n, t = tuple(r.ids.shape) if r.ids is not None and r.ids.dim() == 2 else (0, 0)
    if unknown or r.ids is None or r.ids.dtype != torch.long or not n or t < 2:
        return "not a rollout"
    expected = {"mask": (n, t - 1), "advantages": (n,), "old_logps": (n, t - 1), "ref_logps": (n, t - 1)}
    for name, shape in expected.items():
        x = getattr(r, name)
        if (x is not None or name in ("mask", "advantages")) and (x is None or tuple(x.shape) != shape
                                                                  or not x.is_floating_point()):
            return f"{name} is not a float tensor of shape {shape}"
    if len(r.tokens) != n or not all(isinstance(k, int) and 2 <= k <= t for k in r.tokens):
        return "its row lengths do not match its ids"
    if not all(isinstance(v, tuple) and len(v) == 2 for v in r.stats.values()):
        return "its statistics are malformed"
    return None


@torch.no_grad()
def logps(model, rollout: Rollout, rows: int = 16) -> torch.Tensor:
    """Each row's per-token log-probabilities (N, T − 1) under `model` as it is now (eval mode, no gradient)."""
    was_training = model.training
    model.eval()
    out = torch.cat([token_logps(model(rollout.ids[i:i + rows, :-1].to(model.device)),
                                 rollout.ids[i:i + rows, 1:].to(model.device)).cpu()
                     for i in range(0, len(rollout.ids), rows)])
    model.train(was_training)
    return out


def greedy(model, tok, problems: list[Problem], rewards: list[Reward], correct, max_tokens: int) -> dict:
    """Held-out problems answered greedily: accuracy and mean reward (what each evaluation of a GRPO run shows)."""
    done = complete(model, tok, problems, max_tokens)
    total, _, right = score(done, problems, 1, rewards, correct, max_tokens)
    return {"val_accuracy": float(right.mean()), "val_reward": float(total.mean())}


def micro_batch(r: Rollout, rows: range, first: bool, device) -> dict:
    """Rows of a rollout as one micro-batch, cut to its longest row; the rollout's statistics ride on the first
    micro-batch (the others carry them with weight 0, so each is counted once)."""
    picked = slice(rows.start, rows.stop)
    width = max(r.tokens[picked])
    batch = {"ids": r.ids[picked, :width].to(device), "mask": r.mask[picked, :width - 1].to(device),
             "adv": r.advantages[picked].to(device), "tokens": sum(r.tokens[picked]),
             "stats": r.stats if first else {k: (0.0, 0.0) for k in r.stats}}
    for name in ("old_logps", "ref_logps"):
        if getattr(r, name) is not None:
            batch[name] = getattr(r, name)[picked, :width - 1].to(device)
    return batch


class Health:
    """Warnings a GRPO run owes its user: most groups teaching nothing, or accuracy falling evaluation after
    evaluation (the collapse a too-high learning rate causes)."""

    def __init__(self):
        self.zero_std: list[float] = []
        self.accuracies: list[float] = []

    def rollout(self, r) -> None:
        total, groups = r.stats["frac_reward_zero_std"]
        self.zero_std.append(total / groups)

    def evaluation(self, accuracy: float | None) -> None:
        if self.zero_std and sum(self.zero_std) / len(self.zero_std) > 0.5:
            console.print(f"[yellow]warning:[/yellow] {sum(self.zero_std) / len(self.zero_std):.0%} of the groups "
                          "since the last evaluation had equal rewards (no advantage, nothing learned): the "
                          "problems are too hard or too easy for this model, or the group too small")
        self.zero_std = []
        if accuracy is None:
            return
        self.accuracies.append(accuracy)
        last = self.accuracies[-4:]
        if len(last) == 4 and all(b < a for a, b in zip(last, last[1:], strict=False)):
            console.print(f"[yellow]warning:[/yellow] validation accuracy fell three evaluations in a row "
                          f"({' → '.join(f'{a:.2f}' for a in last)}): a sign of collapse; try a lower optim.lr")


class Rollouts:
    """`rollouts(step, rank)` → the rollout step `step` trains on: sampled at the first step of its μ
    (num_iterations) steps — problems and sampling seed a function of (seed, step, rank), the completions of the
    weights as they are — then reused for the μ − 1 steps after it. With μ > 1 the old log-probabilities are kept
    with it and it is saved in `directory`, so a run resumed within those steps trains on the same rollout."""

    def __init__(self, model, tok, problems: list[Problem], cfg: GRPOConfig, rewards: list[Reward], correct,
                 seed: int, groups: int, pad_id: int, directory: Path, keep: int, precision: str, device,
                 reference: Callable | None, log: Callable[[dict], None] | None):
        self.model, self.tok, self.problems, self.cfg = model, tok, problems, cfg
        self.rewards, self.correct, self.seed, self.groups, self.pad_id = rewards, correct, seed, groups, pad_id
        self.directory, self.keep, self.precision, self.device = directory, keep, precision, device
        self.reference, self.log = reference, log  # log: the main process's, for samples.jsonl
        self.health = Health()
        self._kept: tuple[int, Rollout] | None = None

    def __call__(self, step: int, rank: int) -> Rollout:
        import numpy as np

        from mmctl.data.batches import pick_row
        from mmctl.runtime import autocast

        g = self.cfg
        first = step - step % g.num_iterations
        if self._kept is not None and self._kept[0] == first:
            return self._kept[1]
        if step != first:  # resumed within a rollout's μ steps: train on the one kept from its first step
            kept = load(self.directory, rank, first)
            if kept is not None:
                self._kept = (first, kept)
                return kept
            console.print(f"[yellow]warning:[/yellow] the rollout of step {first + 1} is not in {self.directory}: "
                          "sampling afresh (this run will differ from an uninterrupted one)")
        problems = [self.problems[pick_row(self.seed, first, rank * self.groups + i, len(self.problems))]
                    for i in range(self.groups)]
        seed = int(np.random.default_rng([self.seed, first, rank]).integers(2**31))
        r = sample(self.model, self.tok, problems, g, self.rewards, self.correct, seed, self.pad_id)
        with autocast(self.precision, self.device):
            if g.num_iterations > 1:
                r.old_logps = logps(self.model, r)
            if self.reference is not None:
                r.ref_logps = self.reference(r)
        if g.num_iterations > 1:
            save(r, self.directory, rank, first, self.keep)
        if self.log is not None:
            self.health.rollout(r)
            if first % g.samples_every == 0:
                for record in r.samples:
                    self.log({"step": first + 1, **record})
        self._kept = (first, r)
        return r


def reference(model, full: bool) -> Callable[[Rollout], torch.Tensor]:
    """rollout → its log-probabilities under the starting model. A full fine-tune keeps a frozen copy; adapters
    are simply switched off (no second copy)."""
    import copy

    from mmctl.models import lora

    if full:
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        return lambda r: logps(frozen, r)

    def without_adapters(r: Rollout) -> torch.Tensor:
        with lora.disabled(model):
            return logps(model, r)

    return without_adapters
