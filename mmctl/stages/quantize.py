"""`mmctl quantize`: post-training quantization of a checkpoint by several methods at once, and the table that
compares them with the unquantized model — size, quality and speed — written for you on every run.

Methods (`methods:`, each a checkpoint dir `<out>/<name>/` that `mmctl eval` and `mmctl generate` load):
- `rtn`: round-to-nearest (`mmctl/quant/rtn.py`) — 8 bits symmetric per output row, or 2–4 bits in groups of
  `group` inputs with zero points;
- `gptq`: GPTQ (`mmctl/quant/gptq.py`) on Hessians of every linear's inputs over calibration windows from the
  token shards (measured once, on the unquantized model, and shared by every gptq method);
- `nf4`: bitsandbytes' 4-bit normal-float blocks of 64 with double quantization (`mmctl/quant/bnb.py`), and
- `int8-bnb`: bitsandbytes' LLM.int8() (int8 rows; activation columns above `outlier_threshold` in 16-bit), both
  saved in transformers' bitsandbytes serialization: `AutoModelForCausalLM.from_pretrained(dir)` loads them too.
The embeddings and `skip` (the lm_head by default) stay in floating point. For each row of the report: bytes on
disk, stored bits per quantized weight (scales, zero points and group indices included), perplexity and bits
per byte on held-out shard text with the change against the unquantized model, the scores of `evaluation.tasks`
(eval's task fields), decode tokens/s at batch 1 and the time quantization took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mmctl.console import console
from mmctl.errors import UsageError
from mmctl.evals.tasks import TaskConfig
from mmctl.quant import BNB, MethodConfig
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult

STAGE = "quantize"


@dataclass
class CalibrationSection:
    data: str | None = option(None, "a tokenize output (or its shards dir): GPTQ's calibration windows")
    split: str = option("train", "the shard split the windows come from")
    sequences: int = option(64, "calibration windows", ge=1, le=100_000)
    seq_len: int = option(256, "tokens per window", ge=8, le=2**20)


@dataclass
class EvaluationSection:
    data: str | None = option(None, "a tokenize output (or its shards dir) for held-out perplexity; default: "
                                    "calibration.data; unset too: no perplexity column")
    split: str = option("val", "the shard split scored")
    tokens: int = option(20_000, "score the first documents holding about this many tokens", ge=100)
    tasks: list[TaskConfig] = option(list, "eval tasks scored for every row (fields: mmctl/evals/tasks.py)")
    decode_tokens: int = option(64, "tokens decoded at batch 1 for the speed column", ge=2, le=4096)
    batch_size: int = option(8, "sequences per forward pass when scoring", ge=1, le=65536)


@dataclass
class QuantizeRecipe:
    run: RunConfig = option(RunConfig("out/quantize"), "output directory (<name>/ per method, manifest.json with "
                                                       "the report), seed and device")
    base: str = option(None, "the checkpoint dir to quantize", required=True)
    methods: list[MethodConfig] = option(list, "the methods, one output dir each (fields: method, bits, group, "
                                         "act_order, damp, name)")
    skip: list[str] = option(["lm_head"], "linear layers kept in floating point (names or prefixes)")
    calibration: CalibrationSection = option(CalibrationSection, "GPTQ's calibration data")
    evaluation: EvaluationSection = option(EvaluationSection, "what every row of the report measures")

    def check(self) -> list[tuple[str, str]]:
        problems = [] if self.methods else [("methods", "missing required value: at least one method")]
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            problems.append(("methods", "two methods share a name; give one a `name`"))
        if any(m.method == "gptq" for m in self.methods) and not self.calibration.data:
            problems.append(("calibration.data", "missing required value: gptq needs calibration shards"))
        if any(t.task_kind == "vqa" for t in self.evaluation.tasks):
            problems.append(("evaluation.tasks", "a vqa task asks a vision-language model; quantize takes a "
                                                 "language model"))
        return problems


def inputs(cfg: QuantizeRecipe) -> dict[str, Path]:
    from mmctl import hf

    hf.checkpoint_dir(cfg.base, "base")
    shards = cfg.evaluation.data or cfg.calibration.data
    return {"base": Path(cfg.base), **({"evaluation": Path(shards) / "manifest.json"} if shards else {}),
            **({"calibration": Path(cfg.calibration.data) / "manifest.json"} if cfg.calibration.data else {}),
            **{f"task:{t.label}:{p}": Path(p) for t in cfg.evaluation.tasks for p in (t.data, t.fewshot_data) if p}}


def run(cfg: QuantizeRecipe, options: Options = Options()) -> StageResult:
    """Quantize `base` by every method, write each checkpoint, measure every row of the report."""
    return Job(STAGE, cfg, options, inputs(cfg)).run(quantize_all)


def quantize_all(cfg: QuantizeRecipe, job: Job) -> dict:
    from mmctl import checkpoints
    from mmctl.quant import linear, quantize

    base, tok = _base(cfg, job.device)
    chat = checkpoints.is_chat_model(cfg.base)
    names = list(linear.linears(base, tuple(cfg.skip)))  # the linears every method quantizes
    if not names:
        raise UsageError(f"skip: {cfg.skip} keeps every linear layer of {cfg.base} in floating point: nothing to "
                         "quantize")
    for m in cfg.methods:
        bad = [n for n in names if m.method not in BNB and m.bits != 8 and base.get_submodule(n).in_features % m.group]
        if bad:
            raise UsageError(f"methods: {m.label}: group {m.group} does not divide the inputs of {bad[0]} "
                             f"({base.get_submodule(bad[0]).in_features})")
    measure = _measurer(cfg, tok, cfg.evaluation.data or cfg.calibration.data, chat, job.device)
    job.begin()
    rows = [{"name": "unquantized", "method": "none", "bits": _float_bits(base), "quantize_s": 0.0,
             "bytes": _bytes(Path(cfg.base)), **measure(base)}]
    hessians, calibration_s = None, None
    for m in cfg.methods:
        model = checkpoints.load_lm(cfg.base, device=job.device)
        if m.method == "gptq" and hessians is None:  # once, shared by every gptq row (timed on its own)
            start = time.perf_counter()
            hessians = _calibrate(model, cfg, tok, job.device)
            calibration_s = time.perf_counter() - start
        start = time.perf_counter()
        config = quantize(model, m, tuple(cfg.skip), hessians)
        seconds = time.perf_counter() - start
        out = checkpoints.save(model, job.product(m.label), tok, chat=chat, quantization=config)
        rows.append({"name": m.label, "method": m.method, "bits": linear.stored_bits(model, names),
                     "quantize_s": seconds, "bytes": _bytes(out), **measure(model)})
        console.print(f"{m.label}: {_summary(rows[-1], rows[0])}")
        del model
    return {"rows": rows, "skip": cfg.skip, "calibration": {"sequences": cfg.calibration.sequences,
                                                            "seq_len": cfg.calibration.seq_len,
                                                            "seconds": calibration_s}}


def _base(cfg: QuantizeRecipe, device: str):
    """The floating-point base and its tokenizer; bitsandbytes checked for the methods that need it."""
    from mmctl import checkpoints

    if Path(cfg.base).is_dir() and checkpoints.quantization_of(cfg.base):
        raise UsageError(f"base: {cfg.base} is quantized already; quantize the floating-point checkpoint")
    base, tok = checkpoints.load(cfg.base, device=device)
    for m in cfg.methods:
        if m.method in BNB:
            from mmctl.quant import bnb

            bnb.require(f"method {m.method}")
    return base, tok


def _calibrate(model, cfg: QuantizeRecipe, tok, device) -> dict:
    """Hessians of every linear's inputs over `calibration.sequences` random windows of the shards (measured
    once, on the unquantized model)."""
    import torch

    from mmctl.data.batches import TokenWindows
    from mmctl.quant import linear
    from mmctl.tokenizer.shards import Shards

    c = cfg.calibration
    shards = Shards(c.data, c.split)
    if shards.tokenizer_sha256 != tok.sha256:
        raise UsageError(f"calibration.data: {c.data} was written by another tokenizer than the base's")
    windows = TokenWindows(shards, min(c.seq_len, model.cfg.max_position_embeddings) - 1, cfg.run.seed)
    rows = torch.from_numpy(windows.rows(0, 0, c.sequences))
    return linear.calibration_hessians(model, [rows[i:i + 8].to(device) for i in range(0, len(rows), 8)],
                                       tuple(cfg.skip))


def _measurer(cfg: QuantizeRecipe, tok, shards: str, chat: bool, device):
    """model → the report's measurements: held-out perplexity and bits per byte, the tasks, decode speed."""
    from mmctl.evals import ScoringConfig, perplexity, score
    from mmctl.generate import SamplingConfig, generate

    e = cfg.evaluation
    documents = perplexity.shard_documents(shards, e.split, tok, e.tokens) if shards else None
    scoring = ScoringConfig(batch_size=e.batch_size)
    prompt = tok.encode("Once upon a time")

    def measure(model) -> dict:
        length = model.cfg.max_position_embeddings
        ppl = {"token_perplexity": None, "bits_per_byte": None}
        if documents is not None:
            ppl, _ = perplexity.score(model, tok, documents, max_length=length, stride=length,
                                      batch_size=e.batch_size)
        tasks = {}
        for task in e.tasks:
            metrics, _ = score(model, tok, task, scoring, cfg.run.seed, {}, chat)
            tasks[task.label] = {k: v for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k}
        speed = generate(model, [prompt], SamplingConfig(max_new_tokens=e.decode_tokens)).decode_tokens_per_s
        return {"perplexity": ppl["token_perplexity"], "bits_per_byte": ppl["bits_per_byte"], "tasks": tasks,
                "decode_tokens_per_s": speed}

    return measure


def _bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _float_bits(model) -> float:
    return next(model.parameters()).element_size() * 8.0


def _summary(row: dict, reference: dict) -> str:
    quality = (f", perplexity {row['perplexity']:.3f} ({row['perplexity'] / reference['perplexity'] - 1:+.2%})"
               if row["perplexity"] is not None else "")
    return f"{row['bytes'] / 2**20:.1f} MiB, {row['bits']:.2f} bits/weight{quality}, {row['quantize_s']:.1f} s"


def render(result: StageResult) -> None:
    from rich.table import Table

    from mmctl.report.tables import change, number

    rows = result.results["rows"]
    reference = rows[0]
    tasks = sorted({(t, k) for r in rows for t, metrics in r["tasks"].items() for k in metrics})
    table = Table(title=f"quantization (kept in floating point: embeddings, {', '.join(result.results['skip'])})",
                  title_justify="left")
    for column in ("method", "MiB on disk", "bits / weight", "perplexity", "Δ", "bits / byte",
                   *[f"{t} {k}" for t, k in tasks], "decode tok/s", "quantize s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        delta = change(r, reference)
        table.add_row(r["name"], f"{r['bytes'] / 2**20:.2f}", f"{r['bits']:.2f}", number(r["perplexity"]),
                      "" if r is reference or delta is None else f"{delta:+.2%}", number(r["bits_per_byte"], ".4f"),
                      *[number(r["tasks"].get(t, {}).get(k)) for t, k in tasks],
                      f"{r['decode_tokens_per_s'] or 0:.0f}", f"{r['quantize_s']:.1f}")
    console.print(table)
    console.print(f"checkpoints: {result.out}/<method>/ (mmctl eval and mmctl generate load them)")
