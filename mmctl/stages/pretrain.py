"""`mmctl pretrain`: train a Llama-style decoder from scratch on token shards.

nanoGPT's train.py as a recipe-driven stage: random windows from the verified shards of `mmctl tokenize`, the
one training loop of `mmctl.train.loop`, a validation loss in nats and bits per byte and a greedy sample at
every evaluation, resumable checkpoints, and a Hugging Face checkpoint dir (`<out>/model/`) at the end. The
manifest sets what `mmctl account` predicts beside what the run measured: tokens/s against the device's peak
and the peak memory.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl import recipe
from mmctl.artifacts import Run
from mmctl.console import console
from mmctl.errors import DataError, UsageError
from mmctl.models.transformer import ModelConfig
from mmctl.recipe import option
from mmctl.train.loop import TrainConfig
from mmctl.train.optim import OptimConfig

STAGE = "pretrain"


@dataclass
class RunSection:
    out: str = option("out/pretrain", "output directory: model/, checkpoints/, metrics.jsonl, manifest.json")
    seed: int = option(0, "seed of the initial weights and of the batch order")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "auto: cuda, then mps, then cpu")


@dataclass
class DataSection:
    path: str = option(None, "a `mmctl tokenize` output directory (holding tokenizer/ and shards/)", required=True)


@dataclass
class EvalSection:
    tokens: int = option(65536, "validation tokens scored at each evaluation", ge=1)
    sample_prompt: str = option("Once upon a time", "prompt of the greedy sample logged at each evaluation")
    sample_tokens: int = option(48, "tokens of that sample", ge=1)


@dataclass
class PretrainConfig:
    run: RunSection = option(RunSection, "output directory, seed and device")
    data: DataSection = option(DataSection, "the token shards to train on")
    model: ModelConfig = option(ModelConfig, "the architecture (mmctl/models/transformer.py)")
    optim: OptimConfig = option(OptimConfig, "AdamW and the learning-rate schedule (mmctl/train/optim.py)")
    train: TrainConfig = option(TrainConfig, "steps, batch, precision and schedules (mmctl/train/loop.py)")
    eval: EvalSection = option(EvalSection, "what each evaluation measures")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.train.seq_len > self.model.max_position_embeddings:
            problems.append(("train.seq_len", f"{self.train.seq_len} exceeds model.max_position_embeddings "
                                              f"({self.model.max_position_embeddings})"))
        if self.eval.tokens < self.train.seq_len:
            problems.append(("eval.tokens", f"{self.eval.tokens} is less than one window of train.seq_len "
                                            f"({self.train.seq_len})"))
        return problems


def run(cfg: PretrainConfig, force: bool = False, fresh: bool = False, force_resume: bool = False
        ) -> tuple[Path, dict | None]:
    """Train, then write <out>/model/. Returns (out, results), results None when already up to date."""
    import torch

    from mmctl.data.batches import TokenWindows
    from mmctl.models import hf
    from mmctl.models.transformer import Transformer
    from mmctl.tokenizer import bpe
    from mmctl.tokenizer.shards import Shards
    from mmctl.train import checkpoint
    from mmctl.train.loop import micro_batches, resumable, setup_distributed, train

    out, data = Path(cfg.run.out), Path(cfg.data.path)
    if not (data / "shards" / "manifest.json").is_file():
        raise DataError(f"{data}: no finished `mmctl tokenize` output here (data.path resolves against the working "
                        f"directory, {Path.cwd()}); run the tokenize recipe first")
    tok = bpe.load(data / "tokenizer")
    shards = {split: Shards(data / "shards", split, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
              for split in ("train", "val")}
    if cfg.model.vocab_size < tok.vocab_size:
        raise UsageError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} tokens ({data / 'tokenizer'})")
    if shards["val"].tokens <= cfg.train.seq_len:
        raise DataError(f"{data / 'shards'}: the val split has {shards['val'].tokens} tokens, fewer than one window "
                        f"of {cfg.train.seq_len + 1}; lower train.seq_len or add data")
    dist = setup_distributed(pick_device(cfg.run.device))
    device = dist.device
    rows, accum = micro_batches(cfg.train, dist.world)
    resolved = recipe.to_dict(cfg, STAGE)
    run_dir = Run(out, STAGE, resolved, seed=cfg.run.seed,
                  inputs={"tokenizer": data / "tokenizer" / "tokenizer.json",
                          "shards": data / "shards" / "manifest.json"})
    if not force and run_dir.up_to_date():
        return out, None
    fingerprint = {"model": resolved["model"], "data": run_dir.inputs["shards"]["sha256"],
                   "train.seq_len": cfg.train.seq_len, "train.batch_size": cfg.train.batch_size,
                   "run.seed": cfg.run.seed}
    if fresh and dist.main:
        checkpoint.prune(out / "checkpoints", keep=0)
    dist.barrier()
    # refuse an incompatible checkpoint before the finished run's manifest is touched
    resume_step = _step_of(resumable(out / "checkpoints", fingerprint, force_resume))
    if dist.main:
        run_dir.start(keep_metrics_through=resume_step)

    precision = pick_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.run.seed)
    model = Transformer(cfg.model).to(device)
    peak = peak_flops(device, precision)
    flops_per_token = _flops_per_token(cfg)
    windows = TokenWindows(shards["train"], cfg.train.seq_len, cfg.run.seed)

    def batches(step: int, micro: int, rank: int):
        ids = torch.from_numpy(windows.rows(step, (rank * accum + micro) * rows, rows)).to(device)
        return ids[:, :-1], ids[:, 1:]

    def loss_fn(m, inputs, targets):
        logits = m(inputs)
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

    def evaluate(step: int) -> dict:
        return evaluation(model, tok, shards["val"], cfg, device, precision)

    rss_before = _rss_bytes()
    start = time.time()
    last = train(model, cfg=cfg.train, optim=cfg.optim,
                 batches=batches, loss_fn=loss_fn, out=out, log=run_dir.log, evaluate=evaluate,
                 fingerprint=fingerprint, force_resume=force_resume, precision=precision, dist=dist,
                 flops_per_token=flops_per_token, peak_flops=peak)
    if not dist.main:
        return out, {}
    hf.save_checkpoint(model, out / "model", tokenizer_dir=data / "tokenizer")
    predicted = _predicted(cfg, dist.world, precision)
    results = {
        "final": last,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": time.time() - start,
        "throughput": {"measured_tok_s": last.get("tok_s"), "measured_mfu": last.get("mfu"),
                       "peak_flops": peak, "train_flops_per_token": flops_per_token,
                       "tok_s_at_peak": peak / flops_per_token},
        "memory": {"predicted_peak_bytes": predicted, "measured_peak_rss_bytes": _rss_bytes() - rss_before},
    }
    run_dir.finish(results, device=device)
    return out, results


def pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_precision(precision: str, device: str) -> str:
    """auto: bf16 autocast where it is fast — CUDA with bf16 support, and modern CPUs — else fp32."""
    import torch

    if precision != "auto":
        return precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device == "cpu" else "fp32"


def peak_flops(device: str, precision: str, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 10) -> float:
    """The device's matmul FLOP/s in this precision, measured now: the denominator of MFU.

    A CPU has no datasheet peak worth quoting (clocks, SIMD width and thread count all vary, and a shared
    machine varies by the second), so the best rate of square matmuls of a few sizes, measured in the same
    process just before training, is what MFU is relative to.
    """
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(repeats + 1):  # the first run warms up
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def evaluation(model, tok, val, cfg: PretrainConfig, device: str, precision: str) -> dict:
    """Validation loss (nats/token) and bits per byte over the first `eval.tokens` of the val split, and a greedy
    sample. Bits per byte divide the summed loss by the bytes the target tokens stand for (<|eos|> counts 0), so
    they compare across tokenizers."""
    import numpy as np
    import torch

    from mmctl.generate import SamplingConfig, generate
    from mmctl.train.loop import autocast

    T = cfg.train.seq_len
    token_bytes = _token_bytes(tok)
    need, parts = cfg.eval.tokens + 1, []
    for array in val.arrays:  # read only what the evaluation scores, not the whole split
        parts.append(np.asarray(array[:need - sum(len(p) for p in parts)]))
        if sum(len(p) for p in parts) >= need:
            break
    stream = np.concatenate(parts)
    n = (len(stream) - 1) // T
    ids = torch.from_numpy(stream[: n * T + 1].astype(np.int64))
    inputs, targets = ids[:-1].view(n, T).to(device), ids[1:].view(n, T).to(device)
    model.eval()
    nats, nbytes = 0.0, 0
    with torch.no_grad(), autocast(precision, device):
        for i in range(0, n, 8):
            logits = model(inputs[i:i + 8]).float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                     targets[i:i + 8].reshape(-1), reduction="sum")
            nats += loss.item()
            nbytes += int(token_bytes[targets[i:i + 8].cpu()].sum())
    prompt = tok.encode(cfg.eval.sample_prompt)
    sample = generate(model, [prompt], SamplingConfig(max_new_tokens=cfg.eval.sample_tokens),
                      stop_token_ids=[tok.eos_id]).completions[0].ids
    model.train()
    return {"val_loss": nats / (n * T), "val_bpb": nats / math.log(2) / max(nbytes, 1),
            "sample": cfg.eval.sample_prompt + tok.decode(sample)}


def _token_bytes(tok):
    """Bytes each token id stands for (special tokens: 0), for bits per byte."""
    import torch

    return torch.tensor([len(tok.token_bytes(i)) for i in range(tok.vocab_size)])


def _arch(cfg: PretrainConfig):
    """The model as mmctl.accounting sees it (one set of formulas for `mmctl account` and for MFU)."""
    from mmctl.accounting.arch import from_hf_config
    from mmctl.models.hf import config_to_hf

    return from_hf_config(config_to_hf(cfg.model))


def _flops_per_token(cfg: PretrainConfig) -> float:
    """Training FLOPs per token at train.seq_len (3 × forward)."""
    from mmctl.accounting import formulas

    return 3 * formulas.forward_flops_per_token(_arch(cfg), cfg.train.seq_len)


def _predicted(cfg: PretrainConfig, world: int, precision: str) -> float:
    """`mmctl account`'s training-memory peak for this run (one process, its micro-batch)."""
    from mmctl.accounting import formulas, memory
    from mmctl.accounting.formulas import Workload

    arch = _arch(cfg)
    total = next(int(x.value) for x in formulas.params(arch) if x.key == "params.total")
    w = Workload(**cfg.train.workload(world, precision))
    return next(x.value for x in memory.training_memory(arch, w, total) if x.key == "memory.training.peak")


def _rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _step_of(path: Path | None) -> int | None:
    return int(path.name.split("-")[1]) if path is not None else None


def render(results: dict, out: Path) -> None:
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
