"""`mmctl pretrain`: train a Llama-style decoder from scratch on token shards.

nanoGPT's train.py as a recipe-driven stage: random windows from the verified shards of `mmctl tokenize`, the
one training loop of `mmctl.train.loop`, a validation loss in nats and bits per byte and a greedy sample at
every evaluation, resumable checkpoints, and a Hugging Face checkpoint dir (`<out>/model/`) at the end. The
manifest sets what `mmctl account` predicts beside what the run measured: tokens/s against the device's peak
and the peak memory.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

from mmctl import recipe
from mmctl.console import console
from mmctl.errors import DataError, UsageError
from mmctl.models.config import ModelConfig
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "pretrain"


@dataclass
class PretrainData:
    path: str = option(None, "a `mmctl tokenize` output directory (holding tokenizer/ and shards/)", required=True)


@dataclass
class PretrainEval:
    tokens: int = option(65536, "validation tokens scored at each evaluation", ge=1, le=10**10)
    sample_prompt: str = option("Once upon a time", "prompt of the greedy sample logged at each evaluation")
    sample_tokens: int = option(48, "tokens of that sample", ge=1, le=4096)


@dataclass
class PretrainRecipe:
    run: RunConfig = option(RunConfig("out/pretrain"), "output directory (model/, checkpoints/, metrics.jsonl, "
                                                       "manifest.json), seed and device")
    data: PretrainData = option(PretrainData, "the token shards to train on")
    model: ModelConfig = option(ModelConfig, "the architecture (mmctl/models/config.py)")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch, precision and schedules (mmctl/train/loop.py)")
    eval: PretrainEval = option(PretrainEval, "what each evaluation measures")

    def check(self) -> list[tuple[str, str]]:
        problems = [("train.epochs", "pretraining draws random windows: count steps")] if self.train.epochs else []
        if self.train.seq_len > self.model.max_position_embeddings:
            problems.append(("train.seq_len", f"{self.train.seq_len} exceeds model.max_position_embeddings "
                                              f"({self.model.max_position_embeddings})"))
        if self.eval.tokens < self.train.seq_len:
            problems.append(("eval.tokens", f"{self.eval.tokens} is less than one window of train.seq_len "
                                            f"({self.train.seq_len})"))
        return problems


def inputs(cfg: PretrainRecipe) -> dict[str, Path]:
    data = Path(cfg.data.path)
    if not (data / "shards" / "manifest.json").is_file():
        raise DataError(f"{data}: no finished `mmctl tokenize` output here (data.path resolves against the working "
                        f"directory, {Path.cwd()}); run the tokenize recipe first")
    return {"tokenizer": data / "tokenizer" / "tokenizer.json", "shards": data / "shards" / "manifest.json"}


def run(cfg: PretrainRecipe, options: Options = Options()) -> StageResult:
    """Train, then write <out>/model/ (and the manifest); or find the same run already finished."""
    fits(cfg)  # a recipe no machine can run fails before anything is created
    return Job(STAGE, cfg, options, inputs(cfg), distributed=True, shardable=True).run(pretrain)


def pretrain(cfg: PretrainRecipe, job: Job) -> dict:
    import torch

    from mmctl import checkpoints
    from mmctl.models.transformer import Transformer
    from mmctl.runtime import pick_precision
    from mmctl.train.loop import Parts

    tok, shards = _data(cfg)
    precision = pick_precision(cfg.train.precision, job.device)
    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model).to(job.device)
    rss_before, start = _rss_bytes(), time.time()
    parts = Parts(model, _batches(cfg, shards["train"], job.dist), next_token_loss,
                  evaluate=lambda step: evaluation(model, tok, Path(cfg.data.path) / "shards", cfg, job.device,
                                                   precision),
                  export=lambda d: _export(model, tok, d), flops_per_token=_flops_per_token(cfg),
                  fingerprint={"model": recipe.to_dict(cfg.model), "data": job.dir.inputs["shards"]["sha256"],
                               "train.seq_len": cfg.train.seq_len, "train.batch_size": cfg.train.batch_size,
                               "run.seed": cfg.run.seed})
    last = job.train(parts, cfg.train, cfg.optim, precision)
    if not job.main:
        return {}
    checkpoints.save(model, job.product("model"), tok)
    peak = job.peak_flops
    return {
        "final": last,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": time.time() - start,
        "processes": {"count": job.dist.world, "fsdp": job.dist.fsdp if job.dist.sharded else None},
        "throughput": {"measured_tok_s": last.get("tok_s"), "measured_mfu": last.get("mfu"),
                       "peak_flops": peak, "train_flops_per_token": parts.flops_per_token,
                       "tok_s_at_peak": peak / parts.flops_per_token},
        "memory": {"predicted_peak_bytes": fits(cfg), "measured_peak_rss_bytes": _rss_bytes() - rss_before},
    }


def _data(cfg: PretrainRecipe):
    """The tokenizer and the train/val shards of `data.path`, checked against each other and the model."""
    from mmctl.tokenizer import bpe
    from mmctl.tokenizer.shards import Shards

    data = Path(cfg.data.path)
    tok = bpe.load(data / "tokenizer")
    shards = {split: Shards(data / "shards", split, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
              for split in ("train", "val")}
    if cfg.model.vocab_size < tok.vocab_size:
        raise UsageError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} tokens ({data / 'tokenizer'})")
    if shards["val"].tokens <= cfg.train.seq_len:
        raise DataError(f"{data / 'shards'}: the val split has {shards['val'].tokens} tokens, fewer than one window "
                        f"of {cfg.train.seq_len + 1}; lower train.seq_len or add data")
    return tok, shards


def _batches(cfg: PretrainRecipe, train_shards, dist):
    """batches(step, rank) → this process's micro-batches of random windows (each row a function of seed, step,
    row: one process with 2 micro-batches and 2 processes with 1 train on the same rows)."""
    import torch

    from mmctl.data.batches import TokenWindows
    from mmctl.train.loop import micro_batches

    rows, accum = micro_batches(cfg.train, dist.world)
    windows = TokenWindows(train_shards, cfg.train.seq_len, cfg.run.seed)

    def batches(step: int, rank: int) -> list:
        first = rank * accum * rows
        return [torch.from_numpy(windows.rows(step, first + m * rows, rows)).to(dist.device) for m in range(accum)]

    return batches


def next_token_loss(model, ids):
    """Cross-entropy of every next token in rows of `seq_len + 1` ids, summed (the head and the loss a chunk of
    rows at a time: mmctl/train/loss.py)."""
    from mmctl.train.loop import LossOut
    from mmctl.train.loss import token_loss

    inputs, targets = ids[:, :-1], ids[:, 1:]
    return LossOut(token_loss(model, inputs, targets), targets.numel(), inputs.numel())


def _export(model, tok, directory: Path) -> None:
    """What makes a training checkpoint dir loadable by `mmctl eval` / `generate`: config and tokenizer files."""
    from mmctl import checkpoints, hf

    hf.write_files(directory, None, checkpoints.lm_files(model, tok), tok.files())


def evaluation(model, tok, shards_dir: Path, cfg: PretrainRecipe, device: str, precision: str) -> dict:
    """Validation loss (nats/token) and bits per byte over the val split's first documents holding `eval.tokens`
    tokens, in windows of train.seq_len — `mmctl eval`'s perplexity code, so the two agree — and a greedy
    sample."""
    from mmctl.evals import perplexity
    from mmctl.generate import SamplingConfig, generate
    from mmctl.runtime import autocast

    documents = perplexity.shard_documents(shards_dir, "val", tok, max_tokens=cfg.eval.tokens)
    T = cfg.train.seq_len
    model.eval()
    with autocast(precision, device):
        metrics, _ = perplexity.score(model, tok, documents, max_length=T, stride=T, label="eval")
    model.eval()  # scoring restores the mode it found; sampling wants eval mode too
    prompt = tok.encode(cfg.eval.sample_prompt)
    sample = generate(model, [prompt], SamplingConfig(max_new_tokens=cfg.eval.sample_tokens),
                      stop_token_ids=[tok.eos_id]).completions[0].ids
    model.train()
    return {"val_loss": metrics["nats_per_token"], "val_bpb": metrics["bits_per_byte"],
            "sample": cfg.eval.sample_prompt + tok.decode(sample)}


def _arch(cfg: PretrainRecipe):
    """The model as mmctl.accounting sees it (one set of formulas for `mmctl account` and for MFU)."""
    from mmctl.accounting.arch import from_hf_config

    return from_hf_config(cfg.model.to_hf())


def _flops_per_token(cfg: PretrainRecipe) -> float:
    """Training FLOPs per token at train.seq_len (`mmctl account`'s formula)."""
    from mmctl.accounting import formulas

    return formulas.train_flops_per_token(_arch(cfg), cfg.train.seq_len)


def fits(cfg: PretrainRecipe) -> float:
    """`mmctl account`'s training-memory peak for this run (one process, its micro-batch), refused when it exceeds
    all the device has."""
    import os

    from mmctl.accounting import formulas, memory
    from mmctl.accounting.formulas import Workload
    from mmctl.runtime import ensure_fits, pick_device, pick_precision

    device = pick_device(cfg.run.device)
    world, precision = int(os.environ.get("WORLD_SIZE", "1")), pick_precision(cfg.train.precision, device)
    arch = _arch(cfg)
    total = next(int(x.value) for x in formulas.params(arch) if x.key == "params.total")
    w = Workload(**cfg.train.workload(world, precision))
    peak = next(x.value for x in memory.training_memory(arch, w, total) if x.key == "memory.training.peak")
    ensure_fits(peak, device, "model")
    return peak


def _rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def render(result: StageResult) -> None:
    results, out = result.results, result.out
    final = results["final"]
    t, m = results["throughput"], results["memory"]
    console.print(f"trained {results['params']:,} parameters for {final.get('step')} steps in "
                  f"{results['seconds']:.0f} s: loss {final.get('loss', float('nan')):.3f}, val loss "
                  f"{final.get('val_loss', float('nan')):.3f}, val {final.get('val_bpb', float('nan')):.3f} bits/byte")
    mfu = f"{100 * t['measured_mfu']:.1f}%" if t.get("measured_mfu") is not None else "?"
    console.print(f"throughput {t['measured_tok_s'] or 0:,.0f} tok/s (MFU {mfu} of a measured "
                  f"{t['peak_flops'] / 1e9:.0f} GFLOP/s peak); peak memory: predicted "
                  f"{m['predicted_peak_bytes'] / 1e6:.0f} MB, measured RSS growth "
                  f"{m['measured_peak_rss_bytes'] / 1e6:.0f} MB")
    if "sample" in final:
        console.print(f"sample: {final['sample']!r}", soft_wrap=True)
    console.print(f"model: {out / 'model'}")
