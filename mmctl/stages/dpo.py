"""`mmctl rl` with `algorithm: dpo`: direct preference optimization of a chat model, on the one loop.

TRL's DPOTrainer as a recipe-driven stage: preference pairs from JSONL or datasets (`mmctl/data/rl.py`), or made
on-policy from the starting model's own answers to arithmetic problems (`mmctl/rl/pairs.py`), mixed as every
stage's sources are (mmctl/data/mixture.py); each completion rendered through the chat template after its prompt,
the loss on the completion's tokens only (`mmctl/rl/dpo.py`). The reference model is the starting model, needed
only for each pair's log-probabilities under it: they are computed once, before the first step (TRL's
`precompute_ref_log_probs`), so no second copy of the model is ever in memory and a resumed run computes exactly
the same numbers. Full, LoRA or QLoRA, as sft. Writes `<out>/model/` (merged, a chat model) and for adapters
`<out>/adapter/`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from mmctl import finetune, recipe
from mmctl.console import console
from mmctl.data.rl import PairSource
from mmctl.errors import UsageError
from mmctl.models.lora import LoRAConfig
from mmctl.quant.bnb import QLoRAConfig
from mmctl.recipe import option
from mmctl.rl.dpo import DPOConfig
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "rl"


@dataclass
class PairData:
    sources: list[PairSource] = option(list, "the preference pairs, mixed (fields: kind, path, split, pairs, "
                                             "problems, samples, temperature, weight; mmctl/data/rl.py)")
    val_fraction: float = option(0.05, "share of pairs held out for validation (by content)", ge=0, lt=1)

    def check(self) -> list[tuple[str, str]]:
        return [] if self.sources else [("sources", "missing required value: at least one source")]


@dataclass
class DPORecipe:
    run: RunConfig = option(RunConfig("out/rl"), "output directory (model/, adapter/, checkpoints/, metrics.jsonl, "
                                                 "manifest.json), seed and device")
    algorithm: Literal["dpo"] = option("dpo", "dpo: direct preference optimization on chosen / rejected pairs")
    base: str = option(None, "the starting policy (and reference): an mmctl model/ dir (an sft output) or a local "
                             "Llama / Qwen2 / SmolLM Hugging Face dir", required=True)
    method: Literal["full", "lora", "qlora"] = option("full", finetune.METHOD_HELP)
    lora: LoRAConfig = option(LoRAConfig, finetune.LORA_HELP)
    qlora: QLoRAConfig = option(QLoRAConfig, finetune.QLORA_HELP)
    dpo: DPOConfig = option(DPOConfig, "the DPO loss (mmctl/rl/dpo.py)")
    data: PairData = option(PairData, "the preference pairs")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch (pairs), row length (seq_len), precision")
    eval: finetune.SampleConfig = option(finetune.SampleConfig, "what each evaluation shows")


inputs = finetune.inputs  # the base checkpoint and the source files


def run(cfg: DPORecipe, options: Options = Options()) -> StageResult:
    """Train `base` on the pairs, then write <out>/model/ (merged) and, for adapters, <out>/adapter/."""
    return Job(STAGE, cfg, options, inputs(cfg), distributed=True).run(dpo)


def dpo(cfg: DPORecipe, job: Job) -> dict:
    from mmctl.rl import dpo as loss
    from mmctl.rl import pairs as rl_pairs
    from mmctl.runtime import pick_precision
    from mmctl.train.loop import Parts, for_rows

    model, tok = finetune.load(cfg, job.device)
    (train, val), stats = pairs(cfg, model, tok)  # on-policy pairs come from the model before it changes
    finetune.adapt(model, cfg, tok)
    precision = pick_precision(cfg.train.precision, job.device)
    train_rows, val_rows = (rl_pairs.rows(part, tok, model, cfg.train.seq_len, finetune.pad_id(tok), precision,
                                          job.device) for part in (train, val))
    stats["cut_completions"] = train_rows["cut"] + val_rows["cut"]
    parts = Parts(model, rl_pairs.batches(train_rows, cfg.run.seed, cfg.train, job.dist),
                  lambda m, batch: loss.batch_loss(cfg.dpo, m, batch),
                  evaluate=lambda step: evaluation(model, tok, val_rows, cfg, job.device, precision),
                  export=finetune.exporter(cfg, model, tok),
                  fingerprint=finetune.fingerprint(cfg, job, loss=recipe.to_dict(cfg.dpo)))
    started = time.time()
    last = job.train(parts, for_rows(cfg.train, len(train_rows["chosen"].ids)), cfg.optim, precision)
    return {**finetune.write(cfg, model, tok, job, last, started), "algorithm": "dpo", "data": stats} \
        if job.main else {}


def pairs(cfg: DPORecipe, model, tok) -> tuple[tuple[list, list], dict]:
    """((train pairs, validation pairs), statistics): the sources' pairs, read or made, mixed."""
    from mmctl.data import rl as rl_data
    from mmctl.data.mixture import mix
    from mmctl.rl.pairs import arithmetic_pairs

    stats: dict = {}

    def read(source: PairSource, i: int) -> list:
        if source.kind != "arithmetic":
            return rl_data.read_pairs(source.path, source.split if source.kind == "datasets" else None)
        console.print(f"asking the starting model {source.problems:,} arithmetic problems, {source.samples} "
                      "answers each, for on-policy pairs")
        made, stats[f"sources[{i}]"] = arithmetic_pairs(model, tok, source.problems, cfg.run.seed + i,
                                                        source.samples, source.temperature, source.answer_tokens)
        return made

    train, val = mix(cfg.data.sources, read, cfg.run.seed, cfg.data.val_fraction, key=rl_data.key)
    if not train:
        raise UsageError("data: no training pair (on-policy sources give a pair only where the model answered a "
                         "problem wrongly at least once)")
    stats.update({"pairs": len(train) + len(val), "validation_pairs": len(val)})
    console.print(f"rl data: {stats['pairs']:,} preference pairs ({len(val)} held out)")
    return (train, val), stats


def evaluation(model, tok, val_rows: dict, cfg: DPORecipe, device: str, precision: str) -> dict:
    """The validation pairs' loss and reward accuracy, and a greedy answer to the sample prompt."""
    from mmctl.rl import pairs as rl_pairs

    result = rl_pairs.validation(cfg.dpo, model, val_rows, device, precision)
    sample = finetune.sample_answer(model, tok, cfg.eval.sample_prompt, cfg.eval.sample_tokens)
    model.train()
    return {**result, "sample": sample}


def render(result: StageResult) -> None:
    r = result.results
    final, p = r["final"], r["params"]

    def f(name: str, spec: str = ".3f") -> str:
        return format(final.get(name, float("nan")), spec)

    console.print(f"dpo ({r['method']}): {p['trainable']:,} of {p['total']:,} parameters trained, "
                  f"{final.get('step')} steps in {r['seconds']:.0f} s: loss {f('loss')}, reward accuracy "
                  f"{f('rewards/accuracies', '.2f')}, margin {f('rewards/margins')}; validation: loss {f('val_loss')}, "
                  f"reward accuracy {f('val_rewards/accuracies', '.2f')}")
    if "sample" in final:
        console.print(f"sample: {final['sample']!r}", soft_wrap=True)
    console.print(f"model: {result.out / 'model'}" + (f"; adapter: {result.out / 'adapter'}"
                                                      if r["method"] != "full" else ""))
