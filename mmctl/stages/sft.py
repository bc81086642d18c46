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

import time
from dataclasses import dataclass
from typing import Literal

from mmctl import finetune
from mmctl.console import console
from mmctl.data.sft import ChatSource
from mmctl.errors import UsageError
from mmctl.models.lora import LoRAConfig
from mmctl.quant.bnb import QLoRAConfig
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "sft"


@dataclass
class SFTData:
    sources: list[ChatSource] = option(list, "the conversations (and replayed text), mixed (fields: kind, path, "
                                             "split, conversations, weight; mmctl/data/sft.py)")
    train_on_prompt: bool = option(False, "train on every token, not only the assistant's")
    packing: bool = option(True, "several conversations per row (each attends only to itself); false: one per row")
    val_fraction: float = option(0.05, "share of conversations held out for the validation loss (by content)", ge=0,
                                 lt=1)

    def check(self) -> list[tuple[str, str]]:
        return [] if self.sources else [("sources", "missing required value: at least one source")]


@dataclass
class SFTRecipe:
    run: RunConfig = option(RunConfig("out/sft"), "output directory (model/, adapter/, checkpoints/, metrics.jsonl, "
                                                  "manifest.json), seed and device")
    base: str = option(None, "the checkpoint to fine-tune: an mmctl model/ dir or a local Llama / Qwen2 / SmolLM "
                             "Hugging Face dir", required=True)
    method: Literal["full", "lora", "qlora"] = option("full", finetune.METHOD_HELP)
    lora: LoRAConfig = option(LoRAConfig, finetune.LORA_HELP)
    qlora: QLoRAConfig = option(QLoRAConfig, finetune.QLORA_HELP)
    data: SFTData = option(SFTData, "the conversations and how rows are made")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch, row length (seq_len), precision, schedules")
    eval: finetune.SampleConfig = option(finetune.SampleConfig, "what each evaluation shows")


inputs = finetune.inputs  # the base checkpoint and the source files


def run(cfg: SFTRecipe, options: Options = Options()) -> StageResult:
    """Fine-tune `base`, then write <out>/model/ (merged) and, for adapters, <out>/adapter/."""
    # under FSDP every process evaluates the same rows, so a full fine-tune can shard the whole model
    job = Job(STAGE, cfg, options, inputs(cfg), distributed=True, shardable=cfg.method == "full")
    return job.run(sft)


def sft(cfg: SFTRecipe, job: Job) -> dict:
    from mmctl.runtime import pick_precision
    from mmctl.train.loop import Parts, for_rows

    model, tok = finetune.load(cfg, job.device)
    train_rows, val_rows, stats, _ = rows(cfg, tok)
    finetune.adapt(model, cfg, tok)
    precision = pick_precision(cfg.train.precision, job.device)
    parts = Parts(model, _batches(cfg, train_rows, finetune.pad_id(tok), job.dist), trained_token_loss,
                  evaluate=lambda step: evaluation(model, tok, val_rows, cfg, job.device, precision),
                  export=finetune.exporter(cfg, model, tok), fingerprint=finetune.fingerprint(cfg, job))
    started = time.time()
    last = job.train(parts, for_rows(cfg.train, len(train_rows.ids)), cfg.optim, precision)
    return {**finetune.write(cfg, model, tok, job, last, started), "data": stats} if job.main else {}


def rows(cfg: SFTRecipe, tok):
    """(train rows, validation rows, statistics, training items): the mixture of the sources (data/mixture.py),
    encoded and packed (or padded) into rows of train.seq_len + 1 tokens."""
    from mmctl.data import sft
    from mmctl.data.mixture import mix

    items, held_out = mix(cfg.data.sources, lambda source, i: sft.read(source, cfg.run.seed + i, tok),
                          cfg.run.seed, cfg.data.val_fraction, key=sft.key)
    train_examples = [sft.encode(c, tok, cfg.data.train_on_prompt) for c in items]
    make = sft.pack if cfg.data.packing else sft.pad
    train_rows = make(train_examples, cfg.train.seq_len, finetune.pad_id(tok))
    val_rows = make([sft.encode(c, tok, cfg.data.train_on_prompt) for c in held_out], cfg.train.seq_len,
                    finetune.pad_id(tok))
    if not train_rows.ids or not any(any(r) for r in train_rows.trained):
        raise UsageError("data: no training conversation has a trained token (empty assistant turns, or rows too "
                         "short: raise train.seq_len)")
    cells = len(train_rows.ids) * cfg.train.seq_len
    trained = sum(map(sum, train_rows.trained))
    real = sum(min(len(e.ids), cfg.train.seq_len + 1) for e in train_examples)
    n = len(train_rows.ids)
    stats = {"conversations": len(items) + len(held_out), "validation_conversations": len(held_out), "rows": n,
             "tokens_per_row": cfg.train.seq_len + 1, "real_tokens_per_row": real / n,
             "conversations_per_row": len(items) / n, "trained_tokens": trained, "trained_fraction": trained / cells,
             "real_fraction": real / (cells + n), "cut_conversations": train_rows.cut}
    console.print(f"sft data: {stats['conversations']:,} conversations ({len(held_out)} held out) in {n:,} rows of "
                  f"{cfg.train.seq_len + 1} tokens ({stats['conversations_per_row']:.1f} conversations each); "
                  f"{100 * stats['trained_fraction']:.1f}% of positions trained, {100 * stats['real_fraction']:.1f}% "
                  f"real tokens (the rest padding), {train_rows.cut} cut short")
    return train_rows, val_rows, stats, items


def _batches(cfg: SFTRecipe, rows, pad_id: int, dist):
    """batches(step, rank) → micro-batches of rows drawn as a function of (seed, step, row), as pretrain's are."""
    from mmctl.data.batches import row_batches

    return row_batches(len(rows.ids), cfg.run.seed, cfg.train, dist,
                       lambda picks: _tensors(rows, picks, pad_id, dist.device))


def inspect(cfg: SFTRecipe, n: int) -> dict:
    """The first `n` distinct rows of the first training batch as step 1 gets them (rows are drawn with
    replacement: a repeat is shown once), token by token (`data/annotate.py`),
    and the data's statistics; nothing is trained and no model is loaded."""
    from mmctl.data import annotate
    from mmctl.tokenizer import bpe

    tok = bpe.load(cfg.base)
    train_rows, _, stats, items = rows(cfg, tok)
    picks = list(dict.fromkeys(_pick(cfg, len(train_rows.ids), 0, r) for r in range(cfg.train.batch_size)))[:n]
    return {"data": stats, "rows": [{"row": i, "tokens": annotate.annotate(train_rows, i, items, tok)}
                                    for i in picks]}


def render_inspection(inspection: dict) -> None:
    from mmctl.data import annotate as annotated

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


def _pick(cfg: SFTRecipe, n_rows: int, step: int, r: int) -> int:
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


def evaluation(model, tok, val_rows, cfg: SFTRecipe, device: str, precision: str) -> dict:
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
