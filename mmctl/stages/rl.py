"""`mmctl rl`: reinforcement learning from preferences (DPO) or from verifiable rewards (GRPO), on the one loop.

DPO — TRL's DPOTrainer as a recipe-driven stage: preference pairs from JSONL (`mmctl/data/rl.py`) or built
on-policy from the starting model's own answers to arithmetic problems (`mmctl/rl/pairs.py`), each completion
rendered through the chat template after its prompt with the loss on the completion's tokens only; the losses
and metrics in `mmctl/rl/dpo.py`. The reference model is the starting model, needed only for each pair's
log-probabilities under it: they are computed once, before the first step (TRL's `precompute_ref_log_probs`), so
no second copy of the model is ever in memory and a resumed run computes exactly the same numbers.

GRPO — TRL's GRPOTrainer: each step samples a group of completions per problem from the policy as it is
(`mmctl/rl/rollout.py`), scores them with verifiable rewards (`mmctl/rl/rewards.py`) and trains on the
group-relative advantages (`mmctl/rl/grpo.py`). The sampling seed is a function of (seed, step, process), so a
resumed run samples what the uninterrupted one did; with num_iterations μ > 1 a rollout serves μ steps and is
also kept on disk (`rollouts/`) for a run resumed within them.

Full, LoRA or QLoRA, as sft. Writes `<out>/model/` (merged, a chat model) and for adapters `<out>/adapter/`;
GRPO also `<out>/samples.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl import finetune, recipe
from mmctl.console import console
from mmctl.errors import UsageError
from mmctl.models.lora import LoRAConfig
from mmctl.quant.bnb import QLoRAConfig
from mmctl.recipe import option
from mmctl.rl.dpo import DPOConfig
from mmctl.rl.grpo import GRPOConfig
from mmctl.runtime import RunConfig
from mmctl.stages import Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "rl"


@dataclass
class RLRun(RunConfig):
    out: str = option("out/rl", "output directory: model/ (and adapter/), checkpoints/, metrics.jsonl, manifest.json")


@dataclass
class Source:
    kind: Literal["jsonl", "datasets", "arithmetic"] = option(
        None, "jsonl | datasets (a save_to_disk dir) — dpo: prompt or messages, chosen, rejected; grpo: prompt or "
              "messages, answer | arithmetic — dpo: on-policy pairs from the starting model; grpo: problems",
        required=True)
    path: str | None = option(None, "jsonl: the file; datasets: the directory")
    split: str = option("train", "datasets: the split to read")
    pairs: int | None = option(None, "dpo files: read at most this many pairs", ge=1, le=10**8)
    problems: int | None = option(None, "arithmetic: training problems to make; grpo files: read at most this "
                                        "many", ge=1, le=10**7)
    samples: int = option(4, "dpo arithmetic: answers sampled per problem", ge=2, le=64)
    temperature: float = option(1.0, "dpo arithmetic: sampling temperature of those answers", gt=0)

    def check(self) -> list[tuple[str, str]]:
        if self.kind in ("jsonl", "datasets"):
            return [] if self.path else [("path", f"missing required value: a {self.kind} source needs a path")]
        if self.path or self.pairs:
            return [("path" if self.path else "pairs", "an arithmetic source is made, not read: set problems")]
        return [] if self.problems else [("problems", "missing required value: how many problems to make")]


@dataclass
class DataSection:
    sources: list[Source] = option(list, "the pairs (dpo) or problems (grpo), mixed (fields: kind, path, split, "
                                         "pairs, problems, samples, temperature)")
    val_fraction: float = option(0.05, "share held out for validation", ge=0, lt=1)
    system_prompt: str | None = option(None, "grpo: a system message before every problem that has none (e.g. "
                                             "R1's instruction to think in <think> and answer in <answer>)")

    def check(self) -> list[tuple[str, str]]:
        return [] if self.sources else [("sources", "missing required value: at least one source")]


@dataclass
class RLConfig:
    run: RLRun = option(RLRun, "output directory, seed and device")
    base: str = option(None, "the starting policy (and reference): an mmctl model/ dir (an sft output) or a local "
                             "Llama / Qwen2 / SmolLM Hugging Face dir", required=True)
    algorithm: Literal["dpo", "grpo"] = option(
        "dpo", "dpo: direct preference optimization on chosen / rejected pairs | grpo: group relative policy "
               "optimization on problems with verifiable answers")
    method: Literal["full", "lora", "qlora"] = option("full", finetune.METHOD_HELP)
    lora: LoRAConfig = option(LoRAConfig, finetune.LORA_HELP)
    qlora: QLoRAConfig = option(QLoRAConfig, finetune.QLORA_HELP)
    dpo: DPOConfig = option(DPOConfig, "the DPO loss (mmctl/rl/dpo.py)")
    grpo: GRPOConfig = option(GRPOConfig, "sampling, rewards and the GRPO loss (mmctl/rl/grpo.py)")
    data: DataSection = option(DataSection, "the preference pairs (dpo) or problems (grpo)")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch (dpo: pairs; grpo: completions, a multiple of "
                                             "grpo.group_size), row length (seq_len), precision")
    eval: finetune.EvalSection = option(finetune.EvalSection, "what each evaluation shows")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        for i, s in enumerate(self.data.sources):
            if self.algorithm == "dpo" and s.kind != "arithmetic" and s.problems:
                problems.append((f"data.sources[{i}].problems", f"dpo reads pairs from a {s.kind} source: cap it "
                                                                 "with pairs"))
            if self.algorithm == "grpo" and s.pairs:
                problems.append((f"data.sources[{i}].pairs", "grpo reads problems, not pairs: cap it with problems"))
        if self.algorithm == "dpo" and self.data.system_prompt:
            problems.append(("data.system_prompt", "dpo pairs carry their own messages: put a system message there"))
        if self.algorithm == "grpo" and self.train.batch_size % self.grpo.group_size:
            problems.append(("train.batch_size", f"{self.train.batch_size} completions per step is not a whole "
                                                 f"number of groups of {self.grpo.group_size} (grpo.group_size)"))
        return problems


def run(cfg: RLConfig, options: Options = Options()) -> StageResult:
    """Train `base` by `cfg.algorithm`, then write <out>/model/ (merged) and, for adapters, <out>/adapter/."""
    from mmctl.runtime import pick_precision

    run_dir, dist = finetune.open_run(cfg, STAGE)
    if not options.force and run_dir.up_to_date():
        return StageResult(run_dir.out, run_dir.results(), up_to_date=True)
    model, tok = finetune.load(Path(cfg.base), cfg.method, dist.device, cfg.train.seq_len)
    precision = pick_precision(cfg.train.precision, dist.device)
    prepare = _dpo if cfg.algorithm == "dpo" else _grpo
    parts, stats = prepare(cfg, model, tok, precision, dist, run_dir)
    loss_config = recipe.to_dict(cfg.dpo if cfg.algorithm == "dpo" else cfg.grpo)
    results = finetune.train_and_write(cfg, model, tok, run_dir, dist, options, precision=precision,
                                       loss_config=loss_config, **parts)
    results = {**results, "algorithm": cfg.algorithm, "data": stats} if dist.main else {}
    if dist.main:
        run_dir.finish(results, device=dist.device)
    return StageResult(run_dir.out, results)


def _dpo(cfg: RLConfig, model, tok, precision: str, dist, run_dir) -> tuple[dict, dict]:
    """The loop's parts for DPO (batches, loss, evaluation) and the data's statistics."""
    import torch

    from mmctl.rl import dpo
    from mmctl.rl import pairs as rl_pairs

    pairs, stats = _pairs(cfg, model, tok)
    torch.manual_seed(cfg.run.seed)  # the adapters' initial A, and dropout
    finetune.adapt(model, cfg.method, cfg.lora, cfg.qlora)
    train_rows, val_rows = (rl_pairs.rows(part, tok, model, cfg.train.seq_len, finetune.pad_id(tok), precision,
                                          dist.device) for part in pairs)
    stats["cut_completions"] = train_rows["cut"] + val_rows["cut"]
    return {"batches": rl_pairs.batches(train_rows, cfg.run.seed, cfg.train, dist),
            "loss_fn": lambda m, batch: dpo.batch_loss(cfg.dpo, m, batch),
            "evaluate": lambda step: evaluation(model, tok, val_rows, cfg, dist.device, precision)}, stats


def _pairs(cfg: RLConfig, model, tok):
    """((train pairs, validation pairs), statistics): read or made, shuffled with the seed, split."""
    import random

    from mmctl.data.rl import read_pairs
    from mmctl.rl.pairs import arithmetic_pairs

    pairs, stats = [], {}
    for i, source in enumerate(cfg.data.sources):
        if source.kind in ("jsonl", "datasets"):
            pairs += read_pairs(source.path, source.split if source.kind == "datasets" else None)[: source.pairs]
        else:
            console.print(f"asking the starting model {source.problems:,} arithmetic problems, {source.samples} "
                          "answers each, for on-policy pairs")
            made, stats[f"sources[{i}]"] = arithmetic_pairs(model, tok, source.problems, cfg.run.seed + i,
                                                            source.samples, source.temperature)
            pairs += made
    random.Random(f"rl:{cfg.run.seed}").shuffle(pairs)
    n_val = round(len(pairs) * cfg.data.val_fraction)
    if len(pairs) - n_val < 1:
        raise UsageError("data: no training pair (on-policy sources give a pair only where the model answered a "
                         "problem wrongly at least once)")
    stats.update({"pairs": len(pairs), "validation_pairs": n_val})
    console.print(f"rl data: {len(pairs):,} preference pairs ({n_val} held out)")
    return (pairs[n_val:], pairs[:n_val]), stats


def evaluation(model, tok, val_rows: dict, cfg: RLConfig, device: str, precision: str) -> dict:
    """The validation pairs' loss and reward accuracy, and a greedy answer to the sample prompt."""
    from mmctl.rl import pairs

    result = pairs.validation(cfg.dpo, model, val_rows, device, precision)
    sample = finetune.sample_answer(model, tok, cfg.eval.sample_prompt, cfg.eval.sample_tokens)
    model.train()
    return {**result, "sample": sample}


def _grpo(cfg: RLConfig, model, tok, precision: str, dist, run_dir) -> tuple[dict, dict]:
    """The loop's parts for GRPO (batches that sample, loss, evaluation) and the data's statistics."""
    import numpy as np
    import torch

    from mmctl.data.batches import pick_row
    from mmctl.rl import grpo, rollout
    from mmctl.rl import rewards as reward_fns
    from mmctl.runtime import autocast
    from mmctl.train.loop import micro_batches

    g = cfg.grpo
    rewards, correct = reward_fns.resolve(g.rewards, g.allow_python_rewards), reward_fns.correct(g.rewards)
    (train, val), stats = _problems(cfg, tok)
    torch.manual_seed(cfg.run.seed)  # the adapters' initial A, and dropout
    finetune.adapt(model, cfg.method, cfg.lora, cfg.qlora)
    reference = _reference(cfg, model)
    per_micro, accum = micro_batches(cfg.train, dist.world)
    if (per_micro * accum) % g.group_size:
        raise UsageError(f"train.batch_size: {per_micro * accum} completions per process is not a whole number of "
                         f"groups of {g.group_size}")
    groups = per_micro * accum // g.group_size
    health, cache = rollout.Health(), {}

    def sampled(step: int, rank: int) -> rollout.Rollout:
        """The rollout step `step` trains on: made at the first step of its μ, then reused."""
        first = step - step % g.num_iterations
        if first in cache:
            return cache[first]
        if step != first:  # resumed within a rollout's μ steps: train on the one kept from its first step
            kept = rollout.load(run_dir.out / "rollouts", rank, first)
            if kept is not None:
                cache.clear()
                cache[first] = kept
                return kept
            console.print(f"[yellow]warning:[/yellow] the rollout of step {first + 1} is not in "
                          f"{run_dir.out / 'rollouts'}: sampling afresh (this run will differ from an uninterrupted "
                          "one)")
        problems = [train[pick_row(cfg.run.seed, first, rank * groups + i, len(train))] for i in range(groups)]
        seed = int(np.random.default_rng([cfg.run.seed, first, rank]).integers(2**31))
        r = rollout.sample(model, tok, problems, g, rewards, correct, seed, finetune.pad_id(tok))
        with autocast(precision, dist.device):
            if g.num_iterations > 1:
                r.old_logps = rollout.logps(model, r)
            if reference is not None:
                r.ref_logps = reference(r)
        if g.num_iterations > 1:  # enough to reach back to the newest checkpoint wherever the run stops
            rollout.save(r, run_dir.out / "rollouts", rank, first, cfg.train.checkpoint_every // g.num_iterations + 2)
        if dist.main:
            health.rollout(r)
            if first % g.samples_every == 0:
                for record in r.samples:
                    run_dir.log({"step": first + 1, **record}, to="samples.jsonl")
        cache.clear()
        cache[first] = r
        return r

    def batches(step: int, rank: int) -> list[dict]:
        r = sampled(step, rank)
        return [rollout.micro_batch(r, range(m * per_micro, (m + 1) * per_micro), m == 0, dist.device)
                for m in range(accum)]

    def evaluate(step: int) -> dict:
        result = rollout.greedy(model, tok, val, rewards, correct, g.max_completion_tokens) if val else {}
        health.evaluation(result.get("val_accuracy"))
        sample = finetune.sample_answer(model, tok, cfg.eval.sample_prompt, cfg.eval.sample_tokens)
        model.train()
        return {**result, "sample": sample}

    return {"batches": batches, "loss_fn": lambda m, batch: grpo.batch_loss(g, m, batch), "evaluate": evaluate}, stats


def _problems(cfg: RLConfig, tok):
    """((train problems, validation problems), statistics): read or made, shuffled with the seed, split; every
    prompt must leave room for a whole completion in a row."""
    import random

    from mmctl.data.chat import prompt_ids
    from mmctl.data.rl import Problem, read_problems
    from mmctl.data.synthetic import arithmetic_problems

    problems: list[Problem] = []
    for i, source in enumerate(cfg.data.sources):
        if source.kind == "arithmetic":
            problems += [Problem([{"role": "user", "content": p.question}], str(p.answer))
                         for p in arithmetic_problems(source.problems, cfg.run.seed + i, split="train")]
        else:
            problems += read_problems(source.path, source.split if source.kind == "datasets" else None)[
                : source.problems]
    if cfg.data.system_prompt:
        system = {"role": "system", "content": cfg.data.system_prompt}
        problems = [p if p.prompt[0]["role"] == "system" else Problem([system, *p.prompt], p.answer)
                    for p in problems]
    random.Random(f"rl:{cfg.run.seed}").shuffle(problems)
    n_val = round(len(problems) * cfg.data.val_fraction)
    if len(problems) - n_val < 1:
        raise UsageError("data: no training problem left after the validation share")
    room = cfg.train.seq_len - cfg.grpo.max_completion_tokens
    longest = max(len(prompt_ids(p.prompt, tok)) for p in problems)
    if longest > room:
        raise UsageError(f"train.seq_len: {cfg.train.seq_len} leaves room for a {room}-token prompt beside "
                         f"grpo.max_completion_tokens ({cfg.grpo.max_completion_tokens}); the longest prompt has "
                         f"{longest}")
    console.print(f"rl data: {len(problems):,} problems ({n_val} held out)")
    stats = {"problems": len(problems), "validation_problems": n_val, "longest_prompt_tokens": longest}
    return (problems[n_val:], problems[:n_val]), stats


def _reference(cfg: RLConfig, model):
    """rollout → its log-probabilities under the starting model, or None when beta is 0 (no reference kept). A
    full fine-tune keeps a frozen copy; adapters are simply switched off (no second copy)."""
    import copy

    from mmctl.models import lora
    from mmctl.rl import rollout

    if cfg.grpo.beta == 0:
        return None
    if cfg.method == "full":
        frozen = copy.deepcopy(model).requires_grad_(False).eval()
        return lambda r: rollout.logps(frozen, r)

    def without_adapters(r):
        with lora.disabled(model):
            return rollout.logps(model, r)

    return without_adapters


def render(result: StageResult) -> None:
    r = result.results
    final, p = r["final"], r["params"]

    def f(name: str, spec: str = ".3f") -> str:
        return format(final.get(name, float("nan")), spec)

    head = (f"{r['algorithm']} ({r['method']}): {p['trainable']:,} of {p['total']:,} parameters trained, "
            f"{final.get('step')} steps in {r['seconds']:.0f} s: ")
    if r["algorithm"] == "grpo":
        console.print(head + f"reward {f('reward')}, accuracy {f('accuracy', '.2f')}, groups with equal rewards "
                      f"{f('frac_reward_zero_std', '.0%')}; validation accuracy {f('val_accuracy', '.2f')}")
    else:
        console.print(head + f"loss {f('loss')}, reward accuracy {f('rewards/accuracies', '.2f')}, margin "
                      f"{f('rewards/margins')}; validation: loss {f('val_loss')}, reward accuracy "
                      f"{f('val_rewards/accuracies', '.2f')}")
    if "sample" in final:
        console.print(f"sample: {final['sample']!r}", soft_wrap=True)
    console.print(f"model: {result.out / 'model'}" + (f"; adapter: {result.out / 'adapter'}"
                                                      if r["method"] != "full" else ""))
