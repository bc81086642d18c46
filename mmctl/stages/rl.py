"""`mmctl rl`: learning from preferences — DPO — on the one training loop.

TRL's DPOTrainer as a recipe-driven stage: preference pairs from JSONL (`mmctl/data/preference.py`) or built
on-policy from the starting model's own answers to arithmetic problems (`mmctl/rl/pairs.py`), each completion
rendered through the chat template after its prompt with the loss on the completion's tokens only; the losses
and metrics in `mmctl/rl/dpo.py`. Full, LoRA or QLoRA, as sft.

The reference model is the starting model, and it is needed only for each pair's log-probabilities under it:
they are computed once, before the first step (TRL's `precompute_ref_log_probs`), so no second copy of the model
is ever in memory, LoRA needs no "adapters off" pass, and a resumed run computes exactly the same numbers.

Writes `<out>/model/` (merged, a chat model) and for adapters `<out>/adapter/`, as sft does.
Leaves out (for now): GRPO.
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
from mmctl.runtime import RunConfig
from mmctl.stages import Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "rl"


@dataclass
class RLRun(RunConfig):
    out: str = option("out/rl", "output directory: model/ (and adapter/), checkpoints/, metrics.jsonl, manifest.json")


@dataclass
class PairSource:
    kind: Literal["jsonl", "datasets", "arithmetic"] = option(
        None, "jsonl (prompt or messages, chosen, rejected) | datasets (a save_to_disk dir with those columns) | "
              "arithmetic (on-policy pairs from the starting model)", required=True)
    path: str | None = option(None, "jsonl: the file; datasets: the directory")
    split: str = option("train", "datasets: the split to read")
    pairs: int | None = option(None, "files: read at most this many", ge=1, le=10**8)
    problems: int | None = option(None, "arithmetic: training problems to ask the starting model", ge=1, le=10**7)
    samples: int = option(4, "arithmetic: answers sampled per problem", ge=2, le=64)
    temperature: float = option(1.0, "arithmetic: sampling temperature of those answers", gt=0)

    def check(self) -> list[tuple[str, str]]:
        if self.kind in ("jsonl", "datasets"):
            if not self.path:
                return [("path", f"missing required value: a {self.kind} source needs a path")]
            if self.problems:
                return [("problems", f"a {self.kind} source is read, not asked: use pairs to cap it")]
            return []
        if self.path or self.pairs:
            return [("path" if self.path else "pairs", "an arithmetic source is made, not read: set problems")]
        return [] if self.problems else [("problems", "missing required value: how many problems to ask")]


@dataclass
class DataSection:
    sources: list[PairSource] = option(list, "the pairs, mixed (fields: kind, path, split, pairs, problems, "
                                             "samples, temperature)")
    val_fraction: float = option(0.05, "share of pairs held out for validation", ge=0, lt=1)

    def check(self) -> list[tuple[str, str]]:
        return [] if self.sources else [("sources", "missing required value: at least one source")]


@dataclass
class RLConfig:
    run: RLRun = option(RLRun, "output directory, seed and device")
    base: str = option(None, "the starting policy (and reference): an mmctl model/ dir (an sft output) or a local "
                             "Llama / Qwen2 / SmolLM Hugging Face dir", required=True)
    algorithm: Literal["dpo"] = option("dpo", "dpo: direct preference optimization on chosen / rejected pairs")
    method: Literal["full", "lora", "qlora"] = option("full", finetune.METHOD_HELP)
    lora: LoRAConfig = option(LoRAConfig, finetune.LORA_HELP)
    qlora: QLoRAConfig = option(QLoRAConfig, finetune.QLORA_HELP)
    dpo: DPOConfig = option(DPOConfig, "the DPO loss (mmctl/rl/dpo.py)")
    data: DataSection = option(DataSection, "the preference pairs")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch (pairs per step), row length (seq_len), precision")
    eval: finetune.EvalSection = option(finetune.EvalSection, "what each evaluation shows")


def run(cfg: RLConfig, options: Options = Options()) -> StageResult:
    """Train `base` on preference pairs, then write <out>/model/ (merged) and, for adapters, <out>/adapter/."""
    import torch

    from mmctl.runtime import pick_precision

    run_dir, dist = finetune.open_run(cfg, STAGE)
    if not options.force and run_dir.up_to_date():
        return StageResult(run_dir.out, run_dir.results(), up_to_date=True)
    model, tok = finetune.load(Path(cfg.base), cfg.method, dist.device, cfg.train.seq_len)
    precision = pick_precision(cfg.train.precision, dist.device)
    pairs, stats = _pairs(cfg, model, tok)
    torch.manual_seed(cfg.run.seed)  # the adapters' initial A, and dropout
    finetune.adapt(model, cfg.method, cfg.lora, cfg.qlora)
    train_rows, val_rows = (_rows(cfg, part, tok, model, precision, dist.device) for part in pairs)
    stats["cut_completions"] = train_rows["cut"] + val_rows["cut"]
    results = finetune.train_and_write(
        cfg, model, tok, run_dir, dist, options, batches=_batches(cfg, train_rows, dist),
        loss_fn=lambda m, batch: dpo_loss(cfg, m, batch), precision=precision, loss_config=recipe.to_dict(cfg.dpo),
        evaluate=lambda step: evaluation(model, tok, val_rows, cfg, dist.device, precision))
    results = {**results, "algorithm": cfg.algorithm, "data": stats} if dist.main else {}
    if dist.main:
        run_dir.finish(results, device=dist.device)
    return StageResult(run_dir.out, results)


def _pairs(cfg: RLConfig, model, tok):
    """((train pairs, validation pairs), statistics): read or made, shuffled with the seed, split."""
    import random

    from mmctl.data.preference import read_pairs
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


def _rows(cfg: RLConfig, pairs, tok, model, precision: str, device) -> dict:
    """Chosen and rejected rows (padded to train.seq_len + 1, the mask on the completion) and their summed
    log-probabilities under the reference model — the model as it is now, before any step."""
    import torch

    from mmctl.data import preference
    from mmctl.data.sft import pad
    from mmctl.runtime import autocast

    encoded = [preference.encode(p, tok) for p in pairs]
    pad_id = finetune.pad_id(tok)
    chosen = pad([c for c, _ in encoded], cfg.train.seq_len, pad_id)
    rejected = pad([r for _, r in encoded], cfg.train.seq_len, pad_id)
    rows = {"chosen": chosen, "rejected": rejected, "cut": chosen.cut + rejected.cut,
            "ref": torch.zeros(len(pairs), 2)}
    model.eval()
    with torch.no_grad(), autocast(precision, device):
        for i in range(0, len(pairs), 16):
            batch = _tensors(rows, list(range(i, min(i + 16, len(pairs)))), device)
            rows["ref"][i:i + 16] = _logps(model, batch).view(2, -1).T.cpu()
    return rows


def _batches(cfg: RLConfig, rows: dict, dist):
    """batches(step, rank) → micro-batches of pairs drawn as a function of (seed, step, pair)."""
    from mmctl.data.batches import pick_row
    from mmctl.train.loop import micro_batches

    per_micro, accum = micro_batches(cfg.train, dist.world)
    n = len(rows["chosen"].ids)

    def batches(step: int, rank: int) -> list:
        firsts = [(rank * accum + m) * per_micro for m in range(accum)]
        return [_tensors(rows, [pick_row(cfg.run.seed, step, r, n) for r in range(f, f + per_micro)], dist.device)
                for f in firsts]

    return batches


def _tensors(rows: dict, picks: list[int], device) -> dict:
    """The picked pairs as one batch: chosen rows then rejected rows, cut to the longest real row."""
    import torch

    ids = [rows["chosen"].ids[i] for i in picks] + [rows["rejected"].ids[i] for i in picks]
    trained = [rows["chosen"].trained[i] for i in picks] + [rows["rejected"].trained[i] for i in picks]
    # a row ends with its completion, then padding: its length is the last trained target's position + 2
    lengths = [max((j for j, t in enumerate(row) if t), default=-1) + 2 for row in trained]
    width = max(*lengths, 2)  # (a prompt that fills the row leaves its completion no token: nothing to score)
    ref = rows["ref"][picks]
    return {"ids": torch.tensor([r[:width] for r in ids], device=device),
            "trained": torch.tensor([r[:width - 1] for r in trained], device=device, dtype=torch.float32),
            "ref": torch.cat([ref[:, 0], ref[:, 1]]).to(device), "real": sum(lengths) - len(lengths)}


def _logps(model, batch):
    from mmctl.rl.dpo import sequence_logps

    return sequence_logps(model(batch["ids"][:, :-1]), batch["ids"][:, 1:], batch["trained"])


def dpo_loss(cfg: RLConfig, model, batch):
    """DPO's loss summed over the micro-batch's pairs, with TRL's metrics."""
    from mmctl.rl import dpo
    from mmctl.train.loop import LossOut

    logps, tokens = _logps(model, batch), batch["trained"].sum(-1)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = batch["ref"].chunk(2)
    losses, metrics = dpo.losses(cfg.dpo, chosen, rejected, ref_chosen, ref_rejected, *tokens.chunk(2))
    n = len(chosen)
    return LossOut(losses.sum(), n, batch["real"], {k: (v.sum(), n) for k, v in metrics.items()})


def evaluation(model, tok, val_rows: dict, cfg: RLConfig, device: str, precision: str) -> dict:
    """The validation pairs' loss and reward accuracy, and a greedy answer to the sample prompt."""
    import torch

    from mmctl.runtime import autocast

    model.eval()
    result = {}
    n = len(val_rows["chosen"].ids)
    if n:
        loss = accuracy = margin = 0.0  # sums over the pairs
        with torch.no_grad(), autocast(precision, device):
            for i in range(0, n, 16):
                out = dpo_loss(cfg, model, _tensors(val_rows, list(range(i, min(i + 16, n))), device))
                loss += float(out.sum)
                accuracy += float(out.metrics["rewards/accuracies"][0])
                margin += float(out.metrics["rewards/margins"][0])
        result = {"val_loss": loss / n, "val_rewards/accuracies": accuracy / n, "val_rewards/margins": margin / n}
    sample = finetune.sample_answer(model, tok, cfg.eval.sample_prompt, cfg.eval.sample_tokens)
    model.train()
    return {**result, "sample": sample}


def render(result: StageResult) -> None:
    r = result.results
    final, p = r["final"], r["params"]
    console.print(f"{r['algorithm']} ({r['method']}): {p['trainable']:,} of {p['total']:,} parameters trained, "
                  f"{final.get('step')} steps in {r['seconds']:.0f} s: loss {final.get('loss', float('nan')):.3f}, "
                  f"reward accuracy {final.get('rewards/accuracies', float('nan')):.2f}, margin "
                  f"{final.get('rewards/margins', float('nan')):.3f}; validation: loss "
                  f"{final.get('val_loss', float('nan')):.3f}, reward accuracy "
                  f"{final.get('val_rewards/accuracies', float('nan')):.2f}")
    if "sample" in final:
        console.print(f"sample: {final['sample']!r}", soft_wrap=True)
    console.print(f"model: {result.out / 'model'}" + (f"; adapter: {result.out / 'adapter'}"
                                                      if r["method"] != "full" else ""))
