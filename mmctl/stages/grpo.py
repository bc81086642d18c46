"""`mmctl rl` with `algorithm: grpo`: group relative policy optimization with verifiable rewards, on the one loop.

TRL's GRPOTrainer as a recipe-driven stage: each step samples a group of completions per problem from the policy
as it is (`mmctl/rl/rollout.py`), scores them with verifiable rewards (`mmctl/rl/rewards.py`) and trains on the
group-relative advantages (`mmctl/rl/grpo.py`). Problems come from JSONL, datasets or the built-in arithmetic
generator, mixed as every stage's sources are (mmctl/data/mixture.py). The sampling seed is a function of (seed,
step, process), so a resumed run samples what the uninterrupted one did; with num_iterations μ > 1 a rollout
serves μ steps and is kept on disk until they are done. Full, LoRA or QLoRA, as sft. Writes `<out>/model/`
(merged, a chat model), for adapters `<out>/adapter/`, and sampled completions to `<out>/samples.jsonl`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from mmctl import finetune, recipe
from mmctl.console import console
from mmctl.data.rl import ProblemSource
from mmctl.errors import UsageError
from mmctl.models.lora import LoRAConfig
from mmctl.quant.bnb import QLoRAConfig
from mmctl.recipe import option
from mmctl.rl.grpo import GRPOConfig
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "rl"


@dataclass
class ProblemData:
    sources: list[ProblemSource] = option(list, "the problems, mixed (fields: kind, path, split, problems, weight; "
                                                "mmctl/data/rl.py)")
    val_fraction: float = option(0.05, "share of problems held out for validation (by content)", ge=0, lt=1)
    system_prompt: str | None = option(None, "a system message before every problem that has none (e.g. R1's "
                                             "instruction to think in <think> and answer in <answer>)")

    def check(self) -> list[tuple[str, str]]:
        return [] if self.sources else [("sources", "missing required value: at least one source")]


@dataclass
class GRPORecipe:
    run: RunConfig = option(RunConfig("out/rl"), "output directory (model/, adapter/, checkpoints/, rollouts/, "
                                                 "metrics.jsonl, samples.jsonl, manifest.json), seed and device")
    algorithm: Literal["grpo"] = option("grpo", "grpo: group relative policy optimization on problems with "
                                                "verifiable answers")
    base: str = option(None, "the starting policy (and reference): an mmctl model/ dir (an sft output) or a local "
                             "Llama / Qwen2 / SmolLM Hugging Face dir", required=True)
    method: Literal["full", "lora", "qlora"] = option("full", finetune.METHOD_HELP)
    lora: LoRAConfig = option(LoRAConfig, finetune.LORA_HELP)
    qlora: QLoRAConfig = option(QLoRAConfig, finetune.QLORA_HELP)
    grpo: GRPOConfig = option(GRPOConfig, "sampling, rewards and the GRPO loss (mmctl/rl/grpo.py)")
    data: ProblemData = option(ProblemData, "the problems")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch (completions, a multiple of grpo.group_size), row "
                                             "length (seq_len), precision")
    eval: finetune.SampleConfig = option(finetune.SampleConfig, "what each evaluation shows")

    def check(self) -> list[tuple[str, str]]:
        if self.train.epochs:
            return [("train.epochs", "GRPO samples new completions every step: count steps")]
        if self.train.batch_size % self.grpo.group_size:
            return [("train.batch_size", f"{self.train.batch_size} completions per step is not a whole number of "
                                         f"groups of {self.grpo.group_size} (grpo.group_size)")]
        return []


inputs = finetune.inputs  # the base checkpoint and the source files


def run(cfg: GRPORecipe, options: Options = Options()) -> StageResult:
    """Train `base` on its own sampled answers, then write <out>/model/ (merged) and, for adapters, <out>/adapter/."""
    return Job(STAGE, cfg, options, inputs(cfg), distributed=True).run(grpo)


def grpo(cfg: GRPORecipe, job: Job) -> dict:
    from mmctl.rl import grpo as loss
    from mmctl.rl import rewards as reward_fns
    from mmctl.rl import rollout
    from mmctl.runtime import pick_precision
    from mmctl.train.loop import Parts, micro_batches

    g = cfg.grpo
    rewards = reward_fns.resolve(g.rewards, g.allow_python_rewards, g.reward_seconds)
    correct = reward_fns.correct(g.rewards)
    model, tok = finetune.load(cfg, job.device)
    (train, val), stats = problems(cfg, tok)
    finetune.adapt(model, cfg, tok)
    precision = pick_precision(cfg.train.precision, job.device)
    per_micro, accum = micro_batches(cfg.train, job.dist.world)
    if (per_micro * accum) % g.group_size:
        raise UsageError(f"train.batch_size: {per_micro * accum} completions per process is not a whole number of "
                         f"groups of {g.group_size}")
    reference = rollout.reference(model, cfg.method == "full") if g.beta else None
    keep = cfg.train.checkpoint_every // g.num_iterations + 2  # enough to reach back to the newest checkpoint
    keep = cfg.train.checkpoint_every // g.num_iterations + 2  # enough to reach back to the newest checkpoint
    rollouts = rollout.Rollouts(model, tok, train, g, rewards, correct, cfg.run.seed,
                                per_micro * accum // g.group_size, finetune.pad_id(tok), job.out / "rollouts", keep,
                                precision, job.device, reference,
                                (lambda r: job.log(r, "samples.jsonl")) if job.main else None)

    def batches(step: int, rank: int) -> list[dict]:
        r = rollouts(step, rank)
        return [rollout.micro_batch(r, range(m * per_micro, (m + 1) * per_micro), m == 0, job.device)
                for m in range(accum)]

    def evaluate(step: int) -> dict:
        result = rollout.greedy(model, tok, val, rewards, correct, g.max_completion_tokens) if val else {}
        rollouts.health.evaluation(result.get("val_accuracy"))
        sample = finetune.sample_answer(model, tok, cfg.eval.sample_prompt, cfg.eval.sample_tokens)
        model.train()
        return {**result, "sample": sample}

    parts = Parts(model, batches, lambda m, batch: loss.batch_loss(g, m, batch), evaluate=evaluate,
                  export=finetune.exporter(cfg, model, tok),
                  fingerprint=finetune.fingerprint(cfg, job, loss=recipe.to_dict(g)))
    started = time.time()
    last = job.train(parts, cfg.train, cfg.optim, precision)
    return {**finetune.write(cfg, model, tok, job, last, started), "algorithm": "grpo", "data": stats} \
        if job.main else {}


def problems(cfg: GRPORecipe, tok) -> tuple[tuple[list, list], dict]:
    """((train problems, validation problems), statistics): the sources' problems, mixed; every prompt must leave
    room for a whole completion in a row."""
    from mmctl.data import rl as rl_data
    from mmctl.data.chat import prompt_ids
    from mmctl.data.mixture import mix

    train, val = mix(cfg.data.sources,
                     lambda source, i: rl_data.problems(source, cfg.run.seed + i, cfg.data.system_prompt),
                     cfg.run.seed, cfg.data.val_fraction, key=rl_data.key)
    if not train:
        raise UsageError("data: no training problem left after the validation share")
    room = cfg.train.seq_len - cfg.grpo.max_completion_tokens
    longest = max(len(prompt_ids(p.prompt, tok)) for p in train + val)
    if longest > room:
        raise UsageError(f"train.seq_len: {cfg.train.seq_len} leaves room for a {room}-token prompt beside "
                         f"grpo.max_completion_tokens ({cfg.grpo.max_completion_tokens}); the longest prompt has "
                         f"{longest}")
    console.print(f"rl data: {len(train) + len(val):,} problems ({len(val)} held out)")
    stats = {"problems": len(train) + len(val), "validation_problems": len(val), "longest_prompt_tokens": longest}
    return (train, val), stats


def render(result: StageResult) -> None:
    r = result.results
    final, p = r["final"], r["params"]

    def f(name: str, spec: str = ".3f") -> str:
        return format(final.get(name, float("nan")), spec)

    console.print(f"grpo ({r['method']}): {p['trainable']:,} of {p['total']:,} parameters trained, "
                  f"{final.get('step')} steps in {r['seconds']:.0f} s: reward {f('reward')}, accuracy "
                  f"{f('accuracy', '.2f')}, groups with equal rewards {f('frac_reward_zero_std', '.0%')}; validation "
                  f"accuracy {f('val_accuracy', '.2f')}")
    if "sample" in final:
        console.print(f"sample: {final['sample']!r}", soft_wrap=True)
    console.print(f"model: {result.out / 'model'}" + (f"; adapter: {result.out / 'adapter'}"
                                                      if r["method"] != "full" else ""))
