"""`mmctl sft`: supervised fine-tuning of a checkpoint on conversations — full, LoRA or QLoRA — with the loss
on what the assistant says.

TRL's SFTTrainer (assistant-only loss, packing) and torchtune's LoRA recipes as a recipe-driven stage on the one
training loop: conversations from JSONL files (chat, prompt–completion or alpaca) or built-in offline sets
(`mmctl/data/sft.py`) go through the tokenizer's chat template; the loss is summed over the trained tokens and
normalised once per step by their number across micro-batches and processes. Rows are packed (several
conversations per row, each attending only to itself) or padded. A held-out share of the conversations gives a
validation loss at every evaluation, beside a greedy answer to a sample prompt.

Writes `<out>/model/` — the merged Hugging Face checkpoint, marked as a chat model in generation_config.json
so `mmctl eval` asks it questions through its chat template — and, for LoRA and QLoRA, `<out>/adapter/` in
PEFT's format. QLoRA is LoRA on a base whose linear layers were quantized to 4 bits (bitsandbytes NF4) at load:
only the adapters train, and the merged model is the dequantized base plus the adapters.
`--inspect` shows the first batch's rows token by token — role, conversation and whether it is trained —
without training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl import finetune
from mmctl.console import console
from mmctl.errors import UsageError
from mmctl.models.lora import LoRAConfig
from mmctl.quant.bnb import QLoRAConfig
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "sft"


@dataclass
class SFTRun(RunConfig):
    out: str = option("out/sft", "output directory: model/ (and adapter/), checkpoints/, metrics.jsonl, manifest.json")


@dataclass
class ChatSource:
    kind: Literal["jsonl", "datasets", "arithmetic", "story-questions"] = option(
        None, "jsonl (chat, prompt/completion or alpaca lines) | datasets (a save_to_disk dir with those columns) | "
              "arithmetic | story-questions (built-in)",
        required=True)
    path: str | None = option(None, "jsonl: the file; datasets: the directory")
    split: str = option("train", "datasets: the split to read")
    conversations: int | None = option(None, "built-ins: how many to generate; files: read at most this many",
                                       ge=1, le=10**8)

    def check(self) -> list[tuple[str, str]]:
        read = self.kind in ("jsonl", "datasets")
        if read and not self.path:
            return [("path", f"missing required value: a {self.kind} source needs a path")]
        if not read and self.path:
            return [("path", f"a {self.kind} source is built in and takes no path")]
        if not read and not self.conversations:
            return [("conversations", f"missing required value: how many {self.kind} conversations to generate")]
        return []


@dataclass
class DataSection:
    sources: list[ChatSource] = option(list, "the conversations, mixed (fields: kind, path, split, conversations)")
    train_on_prompt: bool = option(False, "train on every token, not only the assistant's")
    packing: bool = option(True, "several conversations per row (each attends only to itself); false: one per row")
    val_fraction: float = option(0.05, "share of conversations held out for the validation loss", ge=0, lt=1)

    def check(self) -> list[tuple[str, str]]:
        return [] if self.sources else [("sources", "missing required value: at least one source")]


@dataclass
class SFTConfig:
    run: SFTRun = option(SFTRun, "output directory, seed and device")
    base: str = option(None, "the checkpoint to fine-tune: an mmctl model/ dir or a local Llama / Qwen2 / SmolLM "
                             "Hugging Face dir", required=True)
    method: Literal["full", "lora", "qlora"] = option("full", finetune.METHOD_HELP)
    lora: LoRAConfig = option(LoRAConfig, finetune.LORA_HELP)
    qlora: QLoRAConfig = option(QLoRAConfig, finetune.QLORA_HELP)
    data: DataSection = option(DataSection, "the conversations and how rows are made")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch, row length (seq_len), precision, schedules")
    eval: finetune.EvalSection = option(finetune.EvalSection, "what each evaluation shows")


def run(cfg: SFTConfig, options: Options = Options()) -> StageResult:
    """Fine-tune `base`, then write <out>/model/ (merged) and, for adapters, <out>/adapter/."""
    import torch

    from mmctl.runtime import pick_precision

    shardable = cfg.method == "full"  # every process evaluates the same rows, so FSDP can shard the whole model
    run_dir, dist = finetune.open_run(cfg, STAGE, shardable)
    if not options.force and run_dir.up_to_date():
        return StageResult(run_dir.out, run_dir.results(), up_to_date=True)
    model, tok = finetune.load(Path(cfg.base), cfg.method, dist.device, cfg.train.seq_len)
    train_rows, val_rows, stats, _ = _rows(cfg, tok)
    torch.manual_seed(cfg.run.seed)  # the adapters' initial A, and dropout
    finetune.adapt(model, cfg.method, cfg.lora, cfg.qlora)
    precision = pick_precision(cfg.train.precision, dist.device)
    results = finetune.train_and_write(
        cfg, model, tok, run_dir, dist, options, batches=_batches(cfg, train_rows, finetune.pad_id(tok), dist),
        loss_fn=trained_token_loss, evaluate=lambda step: evaluation(model, tok, val_rows, cfg, dist.device, precision),
        precision=precision, shardable=shardable)
    results = {**results, "data": stats} if dist.main else {}
    if dist.main:
        run_dir.finish(results, device=dist.device)
    return StageResult(run_dir.out, results)


def _rows(cfg: SFTConfig, tok):
    """(train rows, validation rows, statistics, training conversations): conversations read, shuffled with the
    seed, split, encoded and packed (or padded) into rows of train.seq_len + 1 tokens."""
    import random

    from mmctl.data import sft

    conversations = []
    for source in cfg.data.sources:
        if source.kind in ("jsonl", "datasets"):
            split = source.split if source.kind == "datasets" else None
            conversations += sft.read_conversations(source.path, split)[: source.conversations]
        else:
            conversations += sft.builtin(source.kind, source.conversations, cfg.run.seed)
    random.Random(f"sft:{cfg.run.seed}").shuffle(conversations)
    n_val = round(len(conversations) * cfg.data.val_fraction)
    examples = [sft.encode(c, tok, cfg.data.train_on_prompt) for c in conversations]
    make = sft.pack if cfg.data.packing else sft.pad
    train_rows = make(examples[n_val:], cfg.train.seq_len, finetune.pad_id(tok))
    val_rows = make(examples[:n_val], cfg.train.seq_len, finetune.pad_id(tok))
    if not train_rows.ids or not any(any(r) for r in train_rows.trained):
        raise UsageError("data: no training conversation has a trained token (empty assistant turns, or rows too "
                         "short: raise train.seq_len)")
    cells = len(train_rows.ids) * cfg.train.seq_len
    trained = sum(map(sum, train_rows.trained))
    real = sum(len(e.ids) for e in examples[n_val:]) - sum(max(0, len(e.ids) - cfg.train.seq_len - 1)
                                                          for e in examples[n_val:])
    stats = {"conversations": len(conversations), "validation_conversations": n_val, "rows": len(train_rows.ids),
             "tokens_per_row": cfg.train.seq_len + 1, "real_tokens_per_row": real / len(train_rows.ids),
             "conversations_per_row": (len(conversations) - n_val) / len(train_rows.ids),
             "trained_tokens": trained, "trained_fraction": trained / cells,
             "real_fraction": real / (cells + len(train_rows.ids)), "cut_conversations": train_rows.cut}
    console.print(f"sft data: {len(conversations):,} conversations ({n_val} held out) in {len(train_rows.ids):,} "
                  f"rows of {cfg.train.seq_len + 1} tokens ({stats['conversations_per_row']:.1f} conversations "
                  f"each); {100 * stats['trained_fraction']:.1f}% of positions trained, "
                  f"{100 * stats['real_fraction']:.1f}% real tokens (the rest padding), {train_rows.cut} cut short")
    return train_rows, val_rows, stats, conversations[n_val:]


def _batches(cfg: SFTConfig, rows, pad_id: int, dist):
    """batches(step, rank) → micro-batches of rows drawn as a function of (seed, step, row), as pretrain's are."""
    from mmctl.train.loop import micro_batches

    per_micro, accum = micro_batches(cfg.train, dist.world)

    def batches(step: int, rank: int) -> list:
        out = []
        for m in range(accum):
            first = (rank * accum + m) * per_micro
            picks = [_pick(cfg, len(rows.ids), step, r) for r in range(first, first + per_micro)]
            out.append(_tensors(rows, picks, pad_id, dist.device))
        return out

    return batches


def inspect(cfg: SFTConfig, n: int) -> dict:
    """The first `n` rows of the first training batch as step 1 gets them, token by token (`data/inspect.py`),
    and the data's statistics; nothing is trained and no model is loaded."""
    from mmctl.data import inspect as annotated
    from mmctl.tokenizer import bpe

    tok = bpe.load(cfg.base)
    rows, _, stats, conversations = _rows(cfg, tok)
    picks = [_pick(cfg, len(rows.ids), 0, r) for r in range(min(n, cfg.train.batch_size))]
    return {"data": stats, "rows": [{"row": i, "tokens": annotated.annotate(rows, i, conversations, tok)}
                                    for i in picks]}


def render_inspection(inspection: dict) -> None:
    from mmctl.data import inspect as annotated

    styled = console.is_terminal and not console.no_color
    console.print("colour: role (system magenta, user cyan, assistant green); " + (
        "bold underlined: trained" if styled else "⟦trained⟧") + " — the loss teaches the model to predict it; │ "
        "separates packed conversations")
    for row in inspection["rows"]:
        s = annotated.summary(row["tokens"])
        console.rule(f"row {row['row']}: {s['conversations']} conversations, {s['real']} of {s['tokens']} tokens "
                     f"real, {s['trained']} trained")
        console.print(annotated.text(row["tokens"], styled), soft_wrap=True)
    d = inspection["data"]
    console.print(f"all {d['rows']:,} training rows: {d['real_tokens_per_row']:.0f} of {d['tokens_per_row']} tokens "
                  f"real on average ({100 * d['real_fraction']:.1f}%: packing efficiency), "
                  f"{d['conversations_per_row']:.1f} conversations per row, "
                  f"{100 * d['trained_fraction']:.1f}% of positions trained, {d['cut_conversations']} cut short")


def _pick(cfg: SFTConfig, n_rows: int, step: int, r: int) -> int:
    from mmctl.data.batches import pick_row

    return pick_row(cfg.run.seed, step, r, n_rows)


def _tensors(rows, picks: list[int], pad_id: int, device) -> dict:
    import torch

    batch = {"ids": torch.tensor([rows.ids[i] for i in picks], device=device),
             "trained": torch.tensor([rows.trained[i] for i in picks], device=device, dtype=torch.float32)}
    if rows.document_ids is not None:
        batch["document_ids"] = torch.tensor([rows.document_ids[i] for i in picks], device=device)
    batch["real"] = int((batch["ids"][:, :-1] != pad_id).sum())
    return batch


def trained_token_loss(model, batch):
    """Cross-entropy summed over the trained target tokens (the assistant's, unless train_on_prompt)."""
    from mmctl.train.loop import LossOut
    from mmctl.train.loss import token_loss

    inputs, targets = batch["ids"][:, :-1], batch["ids"][:, 1:]
    loss = token_loss(model, inputs, targets, batch["trained"], document_ids=batch.get("document_ids"))
    return LossOut(loss, batch["trained"].sum(), batch["real"])


def evaluation(model, tok, val_rows, cfg: SFTConfig, device: str, precision: str) -> dict:
    """Validation loss per trained token over the held-out conversations, and a greedy answer to the sample."""
    import torch

    from mmctl.runtime import autocast

    model.eval()
    result = {}
    if val_rows.ids:
        nats, count = 0.0, 0.0
        with torch.no_grad(), autocast(precision, device):
            for i in range(0, len(val_rows.ids), 8):
                out = trained_token_loss(model, _tensors(val_rows, list(range(i, min(i + 8, len(val_rows.ids)))),
                                                         finetune.pad_id(tok), device))
                nats, count = nats + float(out.sum), count + float(out.count)
        if count:
            result["val_loss"] = nats / count
    sample = finetune.sample_answer(model, tok, cfg.eval.sample_prompt, cfg.eval.sample_tokens)
    model.train()
    return {**result, "sample": sample}


def render(result: StageResult) -> None:
    r = result.results
    final, p = r["final"], r["params"]
    console.print(f"{r['method']} fine-tuning: {p['trainable']:,} of {p['total']:,} parameters trained "
                  f"({100 * p['trainable_fraction']:.2f}%), {final.get('step')} steps in {r['seconds']:.0f} s: "
                  f"loss {final.get('loss', float('nan')):.3f}, val loss {final.get('val_loss', float('nan')):.3f}")
    if "sample" in final:
        console.print(f"sample: {final['sample']!r}", soft_wrap=True)
    console.print(f"model: {result.out / 'model'}" + (f"; adapter: {result.out / 'adapter'}"
                                                      if r["method"] != "full" else ""))
