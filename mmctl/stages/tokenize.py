"""`mmctl tokenize`: train a byte-level BPE tokenizer and encode corpora into verified token shards.

CS336 assignment 1 and nanochat's `tok_train` as a recipe-driven stage. It writes `<out>/tokenizer/` (loads
with `transformers.AutoTokenizer`), `<out>/shards/` (the DESIGN §5 shard format, read by every training stage)
and `<out>/manifest.json` with the corpus report: tokens, documents, bytes per token, vocabulary coverage, the
longest tokens and the encode throughput.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mmctl.artifacts import atomic_write_json
from mmctl.console import Progress, console
from mmctl.data.sources import FILE_KINDS, TextSource, files, mixture
from mmctl.errors import DataError, MmctlError
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult
from mmctl.tokenizer import bpe
from mmctl.tokenizer.shards import Shards, ShardWriter, write_manifest

STAGE = "tokenize"
SPLITS = ("train", "val")
BATCH = 1024  # documents per encode_batch call: large enough for the Rust thread pool, small enough for memory


@dataclass
class TokenizeData:
    sources: list[TextSource] = option(list, "the corpora, mixed in order (fields: mmctl/data/sources.py)")
    val_fraction: float = option(0.05, "share of documents held out for validation", ge=0, lt=1)

    def check(self) -> list[tuple[str, str]]:
        return [] if self.sources else [("sources", "missing required value: at least one source")]


@dataclass
class TokenizerSection:
    path: str | None = option(None, "reuse this tokenizer directory (mmctl's or a local Hugging Face one)")
    vocab_size: int = option(4096, "vocabulary size, special tokens included (at most 2^24: the largest real ones "
                                           "are ~2^18, and the trainer fails far below the id type's 2^32)",
                              ge=len(bpe.SPECIAL_TOKENS) + 256, le=2**24)
    min_frequency: int = option(2, "merge only pairs seen at least this often", ge=1)
    pattern: Literal["llama3", "llama3-digits", "gpt2"] = option(
        "llama3", "pre-tokenizer regex: llama3 (GPT-4's), llama3-digits (the same, one token per digit) or gpt2")
    max_length: int = option(2048, "model_max_length recorded in tokenizer_config.json (tokens)", ge=1)


@dataclass
class ShardsSection:
    shard_tokens: int = option(50_000_000, "tokens per shard file at most (a longer document gets its own)", ge=1)
    workers: int | Literal["auto"] = option(1, "processes encoding documents (auto: one per CPU); the shards are "
                                               "the same for any number (mmctl/tokenizer/workers.py)", ge=1, le=1024)


@dataclass
class TokenizeRecipe:
    run: RunConfig = option(RunConfig("out/tokenize"), "where the outputs go (tokenizer/, shards/, manifest.json), "
                                                       "and the seed of the generated corpora, the train/val split and "
                                                       "the mixture sampling")
    data: TokenizeData = option(TokenizeData, "the corpora and the validation split")
    tokenizer: TokenizerSection = option(TokenizerSection, "train a BPE tokenizer, or reuse one")
    shards: ShardsSection = option(ShardsSection, "the token shard files")


def inputs(cfg: TokenizeRecipe) -> dict[str, Path]:
    """Every input file whose content decides the output (for the manifest and the up-to-date check)."""
    inputs: dict[str, Path] = {}
    for i, source in enumerate(cfg.data.sources):
        if source.kind in FILE_KINDS and not source.path.startswith("hf:"):
            paths = [Path(source.path)] if Path(source.path).is_dir() else files(source.path)
            inputs.update({f"sources[{i}]:{p}": p for p in paths})
    if cfg.tokenizer.path:
        inputs["tokenizer"] = Path(cfg.tokenizer.path)
    return inputs


def run(cfg: TokenizeRecipe, options: Options = Options()) -> StageResult:
    """Tokenizer and shards into run.out (or the same run found already finished there)."""
    return Job(STAGE, cfg, options, inputs(cfg), computes=False).run(tokenize)


def tokenize(cfg: TokenizeRecipe, job: Job) -> dict:
    job.begin()
    work = Work(job)
    tok, train_seconds = work.tokenizer(cfg)
    results = encode(cfg, tok, work)
    results["tokenizer"] = {"vocab_size": tok.vocab_size, "sha256": tok.sha256, "train_seconds": train_seconds,
                            "longest_tokens": bpe.longest_tokens(tok)}
    for name in ("tokenizer", "shards"):  # the finished work becomes the run's products
        (work.dir / name).rename(job.product(name))
    for split in SPLITS:  # every shard in place and as its manifest says, before the stage's manifest says done
        Shards(job.product("shards"), split, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
    shutil.rmtree(work.dir)
    return results


class Work:
    """A run's work in progress, in `<out>/checkpoints/`: the tokenizer, the shards so far and `progress.json`
    (how many of the mixture's documents they hold, each split's shard state, the corpus counts), saved each time
    a shard is finished. A run killed or interrupted leaves it there; the next run of the same recipe on the same
    inputs continues from it (any other run, or `--fresh`, starts over). A finished run publishes it and removes
    it."""

    def __init__(self, job: Job):
        self.dir, self.job = job.out / "checkpoints", job
        recipe = {**job.dir.recipe, "shards": {k: v for k, v in job.dir.recipe["shards"].items() if k != "workers"}}
        recipe["run"] = {k: v for k, v in recipe["run"].items() if k != "device"}  # (same shards either way)
        self.fingerprint = {"recipe": recipe, "inputs": {k: v["sha256"] for k, v in job.dir.inputs.items()}}
        self.progress: dict | None = None
        try:
            saved = json.loads((self.dir / "progress.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("fingerprint") == self.fingerprint and not job.options.fresh:
            self.progress = saved
        elif self.dir.exists():
            why = "--fresh" if job.options.fresh else "another recipe or other inputs" if saved else "incomplete"
            console.print(f"note: starting over: {self.dir} held an unfinished run ({why})")
            shutil.rmtree(self.dir)

    def tokenizer(self, cfg: TokenizeRecipe) -> tuple[bpe.Tokenizer, float | None]:
        if self.progress is not None:
            try:
                tok = bpe.load(self.dir / "tokenizer")
            except MmctlError:
                tok = None
            if tok is not None and tok.sha256 == self.progress["tokenizer_sha256"]:
                return tok, self.progress["train_seconds"]
            console.print(f"note: starting over: {self.dir / 'tokenizer'} is not the one saved with the progress")
            self.progress = None
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        tok, seconds = make_tokenizer(cfg, self.dir / "tokenizer")
        (self.dir / "shards").mkdir()
        self.save({"tokenizer_sha256": tok.sha256, "train_seconds": seconds, "documents": 0, "splits": None})
        return tok, seconds

    def save(self, progress: dict) -> None:
        self.progress = {"fingerprint": self.fingerprint, **progress}
        atomic_write_json(self.dir / "progress.json", self.progress)
        self.job.saved_work = True  # a failure from here on leaves the directory to this run, to be continued


def make_tokenizer(cfg: TokenizeRecipe, out: Path) -> tuple[bpe.Tokenizer, float | None]:
    """Train on the training split (or copy the given tokenizer) into directory `out`."""
    out.mkdir(parents=True)
    seconds = None
    if cfg.tokenizer.path:
        source = bpe.load(cfg.tokenizer.path)  # validates it before anything is copied
        for name in bpe.FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, out / name)
    else:
        t = cfg.tokenizer
        docs = (doc for split, _, doc in mixture(cfg.data.sources, cfg.run.seed, cfg.data.val_fraction)
                if split == "train")
        console.print(f"training a {t.vocab_size}-token byte-level BPE ({t.pattern} pre-tokenizer)")
        start = time.perf_counter()
        backend = bpe.train(docs, t.vocab_size, t.min_frequency, t.pattern)
        seconds = time.perf_counter() - start
        bpe.save(backend, out, t.max_length)
    return bpe.load(out), seconds


def encode(cfg: TokenizeRecipe, tok: bpe.Tokenizer, work: Work) -> dict:
    """Encode every document (each followed by <|eos|>) into shards in `work.dir / "shards"` — continuing from the
    saved progress, if any — and report on the corpus."""
    from mmctl.tokenizer import workers

    out, saved = work.dir / "shards", work.progress
    stats = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    seen = np.zeros(tok.vocab_size, dtype=bool)
    resumed = saved["splits"] is not None
    try:
        writers = {split: ShardWriter(out, split, tok.vocab_size, cfg.shards.shard_tokens,
                                      saved["splits"][split]["writer"] if resumed else None) for split in SPLITS}
    except DataError as e:
        raise DataError(f"{e.problems[0]} (the unfinished run in {work.dir} cannot continue: --fresh starts "
                        "over)") from None
    position = saved["documents"]  # documents of the mixture already in the shards
    if resumed:
        stats = {split: saved["splits"][split]["stats"] for split in SPLITS}
        seen = np.unpackbits(np.frombuffer(base64.b64decode(saved["seen"]), dtype=np.uint8))[:tok.vocab_size] > 0
        console.print(f"resuming: {position:,} documents already encoded in {work.dir} (--fresh starts over)")
    processes = workers.count(cfg.shards.workers)
    shards_done, bytes_before = sum(len(w.entries) for w in writers.values()), sum(s["bytes"] for s in stats.values())
    start = time.perf_counter()
    with Progress(None, "encode") as progress:
        for batch, encoded in workers.encode_in_order(tok, _batches(cfg, position), writers["train"].dtype,
                                                      processes):
            for (split, doc), ids in zip(batch, encoded, strict=True):
                writers[split].add(np.append(ids, np.asarray(tok.eos_id, dtype=ids.dtype)))
                s = stats[split]
                s["documents"] += 1
                s["tokens"] += len(ids) + 1
                s["bytes"] += len(doc.encode("utf-8"))
                if split == "train":
                    seen[ids] = True
                position += 1
                if sum(len(w.entries) for w in writers.values()) > shards_done:  # a shard finished: save progress
                    shards_done += 1
                    work.save({**saved, "documents": position, "seen": base64.b64encode(np.packbits(seen)).decode(),
                               "splits": {k: {"writer": w.state(), "stats": stats[k]} for k, w in writers.items()}})
            progress.update(position, MB_s=(sum(s["bytes"] for s in stats.values()) - bytes_before) / 1e6
                            / (time.perf_counter() - start))
    seconds = time.perf_counter() - start
    entries = {split: writers[split].close() for split in SPLITS}
    write_manifest(out, tok.sha256, tok.vocab_size, tok.eos_id, entries)
    train = stats["train"]
    special = len([t for t in bpe.SPECIAL_TOKENS if tok.token_id(t) is not None])
    return {
        "splits": stats,
        "bytes_per_token": train["bytes"] / max(train["tokens"] - train["documents"], 1),
        "vocab_coverage": float(seen.sum()) / max(tok.vocab_size - special, 1),
        "encode_mb_per_s": (sum(s["bytes"] for s in stats.values()) - bytes_before) / 1e6 / max(seconds, 1e-9),
        "encode_workers": processes,
        "resumed_at_document": saved["documents"] if resumed else None,
    }


def _batches(cfg: TokenizeRecipe, skip: int = 0):
    """The mixture's (split, document) pairs after the first `skip`, BATCH at a time."""
    batch: list[tuple[str, str]] = []
    for split, _, doc in itertools.islice(mixture(cfg.data.sources, cfg.run.seed, cfg.data.val_fraction), skip, None):
        batch.append((split, doc))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def render(result: StageResult) -> None:
    from rich.table import Table

    results, out = result.results, result.out
    table = Table(title=f"Corpus ({out / 'shards'})", title_justify="left")
    for col in ("split", "documents", "tokens", "MB"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, s in results["splits"].items():
        table.add_row(split, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes'] / 1e6:.2f}")
    console.print(table)
    tok = results["tokenizer"]
    trained = f", trained in {tok['train_seconds']:.1f} s" if tok["train_seconds"] is not None else ""
    console.print(f"tokenizer: {tok['vocab_size']} tokens{trained}; "
                  f"bytes per token {results['bytes_per_token']:.2f}; "
                  f"vocabulary used {100 * results['vocab_coverage']:.1f}%; "
                  f"encode {results['encode_mb_per_s']:.1f} MB/s"
                  + (f" ({results['encode_workers']} processes)" if results.get("encode_workers", 1) > 1 else ""))
    console.print("longest tokens: " + "  ".join(repr(t) for t in tok["longest_tokens"]), soft_wrap=True)
