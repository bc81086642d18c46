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
from typing import Literal

from mmctl import recipe
from mmctl.console import console
from mmctl.errors import UsageError
from mmctl.evals.tasks import TaskConfig
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Options, StageResult

STAGE = "quantize"
BNB = ("nf4", "int8-bnb")  # the methods bitsandbytes does


@dataclass
class QuantizeRun(RunConfig):
    out: str = option("out/quantize", "output directory: <name>/ per method, manifest.json (the report)")


@dataclass
class Method:
    method: Literal["rtn", "gptq", "nf4", "int8-bnb"] = option(
        None, "rtn (round-to-nearest) | gptq | nf4 | int8-bnb (the last two: bitsandbytes; bits and group do not "
              "apply)", required=True)
    bits: int = option(4, "bits per weight: 8 (rtn: symmetric per row), or 2, 3, 4 (in groups)", ge=2, le=8)
    group: int = option(64, "inputs per group sharing a scale and zero point (under 8 bits)", ge=8)
    act_order: bool = option(False, "gptq: quantize the most active inputs first (desc_act)")
    damp: float = option(0.01, "gptq: dampening added to the Hessian's diagonal, × its mean", gt=0, lt=1)
    outlier_threshold: float = option(6.0, "int8-bnb: activation columns with a value above this multiply in "
                                           "16-bit (LLM.int8()); 0: every column in int8", ge=0)
    name: str | None = option(None, "the output dir and row label; default e.g. gptq-4bit-g64")

    def check(self) -> list[tuple[str, str]]:
        if self.bits not in (2, 3, 4, 8):
            return [("bits", f"{self.bits}: expected 2, 3, 4 or 8")]
        if self.method == "gptq" and self.bits == 8:
            return [("bits", "gptq quantizes to 2, 3 or 4 bits (8 bits: rtn is within 0.5% already)")]
        return []

    @property
    def label(self) -> str:
        if self.method in BNB:
            return self.name or self.method
        return self.name or (f"{self.method}-8bit" if self.bits == 8 else f"{self.method}-{self.bits}bit-g{self.group}"
                             + ("-act" if self.act_order else ""))


@dataclass
class CalibrationSection:
    data: str | None = option(None, "a token shards dir (`mmctl tokenize` output): GPTQ's calibration windows")
    split: str = option("train", "the shard split the windows come from")
    sequences: int = option(64, "calibration windows", ge=1, le=100_000)
    seq_len: int = option(256, "tokens per window", ge=8)


@dataclass
class EvaluationSection:
    data: str | None = option(None, "a token shards dir for held-out perplexity; default: calibration.data")
    split: str = option("val", "the shard split scored")
    tokens: int = option(20_000, "score the first documents holding about this many tokens", ge=100)
    tasks: list[TaskConfig] = option(list, "eval tasks scored for every row (fields: mmctl/evals/tasks.py)")
    decode_tokens: int = option(64, "tokens decoded at batch 1 for the speed column", ge=2)
    batch_size: int = option(8, "sequences per forward pass when scoring", ge=1)


@dataclass
class QuantizeConfig:
    run: QuantizeRun = option(QuantizeRun, "output directory, seed and device")
    base: str = option(None, "the checkpoint dir to quantize", required=True)
    methods: list[Method] = option(list, "the methods, one output dir each (fields: method, bits, group, "
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
        if not (self.evaluation.data or self.calibration.data):
            problems.append(("evaluation.data", "missing required value: shards for the held-out perplexity"))
        return problems


def run(cfg: QuantizeConfig, options: Options = Options()) -> StageResult:
    """Quantize `base` by every method, write each checkpoint, measure every row of the report."""
    from mmctl.artifacts import Run
    from mmctl.models import transformer
    from mmctl.quant import linear
    from mmctl.runtime import pick_device

    shards = cfg.evaluation.data or cfg.calibration.data
    inputs = {"base": Path(cfg.base), "evaluation": Path(shards) / "manifest.json",
              **({"calibration": Path(cfg.calibration.data) / "manifest.json"} if cfg.calibration.data else {}),
              **{f"task:{t.label}:{p}": Path(p) for t in cfg.evaluation.tasks for p in (t.data, t.fewshot_data) if p}}
    run_dir = Run(Path(cfg.run.out), STAGE, recipe.to_dict(cfg, STAGE), inputs=inputs, seed=cfg.run.seed)
    if not options.force and run_dir.up_to_date():
        return StageResult(run_dir.out, run_dir.results(), up_to_date=True)
    device = pick_device(cfg.run.device)
    base, tok = transformer.load_with_tokenizer(cfg.base, device=device, quantized=True)
    if getattr(base, "quantization", None):
        raise UsageError(f"base: {cfg.base} is quantized already; quantize the floating-point checkpoint")
    for m in cfg.methods:
        if m.method in BNB:
            from mmctl.quant import bnb

            bnb.require(f"method {m.method}")
    chat = transformer.is_chat_model(cfg.base)
    names = list(linear.linears(base, tuple(cfg.skip)))  # the linears every method quantizes
    for m in cfg.methods:
        bad = [n for n in names if m.method not in BNB and m.bits != 8 and base.get_submodule(n).in_features % m.group]
        if bad:
            raise UsageError(f"methods: {m.label}: group {m.group} does not divide the inputs of {bad[0]} "
                             f"({base.get_submodule(bad[0]).in_features})")
    run_dir.start()
    measure = _measurer(cfg, tok, shards, chat, device)
    rows = [{"name": "unquantized", "method": "none", "bits": _float_bits(base), "quantize_s": 0.0,
             "bytes": _bytes(Path(cfg.base)), **measure(base)}]
    hessians, calibration_s = None, None
    for m in cfg.methods:
        model = transformer.load_checkpoint(cfg.base, device=device)
        if m.method == "gptq" and hessians is None:  # once, shared by every gptq row (timed on its own)
            start = time.perf_counter()
            hessians = _calibrate(model, cfg, tok, device)
            calibration_s = time.perf_counter() - start
        start = time.perf_counter()
        if m.method in BNB:
            from mmctl.quant import bnb

            nf4 = bnb.QLoRAConfig("nf4", double_quant=True) if m.method == "nf4" else None
            if nf4:
                bnb.to_4bit(model, nf4, tuple(cfg.skip))
            else:
                bnb.to_int8(model, m.outlier_threshold, tuple(cfg.skip))
            model.quantization = bnb.checkpoint_config(nf4, tuple(cfg.skip), m.outlier_threshold)
        else:
            model.quantization = linear.quantize_model(model, m.method, m.bits, m.group, hessians=hessians,
                                                       damp=m.damp, act_order=m.act_order, skip=tuple(cfg.skip))
        seconds = time.perf_counter() - start
        out = transformer.save_checkpoint(model, run_dir.out / m.label, tok, chat=chat)
        rows.append({"name": m.label, "method": m.method, "bits": linear.stored_bits(model, names),
                     "quantize_s": seconds, "bytes": _bytes(out), **measure(model)})
        console.print(f"{m.label}: {_summary(rows[-1], rows[0])}")
        del model
    results = {"rows": rows, "skip": cfg.skip, "calibration": {"sequences": cfg.calibration.sequences,
                                                               "seq_len": cfg.calibration.seq_len,
                                                               "seconds": calibration_s}}
    run_dir.finish(results, device=device)
    return StageResult(run_dir.out, results)


def _calibrate(model, cfg: QuantizeConfig, tok, device) -> dict:
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


def _measurer(cfg: QuantizeConfig, tok, shards: str, chat: bool, device):
    """model → the report's measurements: held-out perplexity and bits per byte, the tasks, decode speed."""
    from mmctl.evals import perplexity
    from mmctl.evals import run as run_task
    from mmctl.generate import SamplingConfig, generate

    e = cfg.evaluation
    documents = perplexity.shard_documents(shards, e.split, tok, e.tokens)
    scoring = run_task.EvalSection(batch_size=e.batch_size)
    prompt = tok.encode("Once upon a time")

    def measure(model) -> dict:
        length = model.cfg.max_position_embeddings
        ppl, _ = perplexity.score(model, tok, documents, max_length=length, stride=length,
                                  batch_size=e.batch_size)
        tasks = {}
        for task in e.tasks:
            metrics, _ = run_task.score(model, tok, task, scoring, cfg.run.seed, {}, chat)
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
    change = row["perplexity"] / reference["perplexity"] - 1
    return (f"{row['bytes'] / 2**20:.1f} MiB, {row['bits']:.2f} bits/weight, perplexity {row['perplexity']:.3f} "
            f"({change:+.2%}), {row['quantize_s']:.1f} s")


def render(result: StageResult) -> None:
    from rich.table import Table

    rows = result.results["rows"]
    reference = rows[0]
    tasks = sorted({(t, k) for r in rows for t, metrics in r["tasks"].items() for k in metrics})
    table = Table(title=f"quantization (kept in floating point: embeddings, {', '.join(result.results['skip'])})",
                  title_justify="left")
    for column in ("method", "MiB on disk", "bits / weight", "perplexity", "Δ", "bits / byte",
                   *[f"{t} {k}" for t, k in tasks], "decode tok/s", "quantize s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in rows:
        change = r["perplexity"] / reference["perplexity"] - 1
        table.add_row(r["name"], f"{r['bytes'] / 2**20:.2f}", f"{r['bits']:.2f}", f"{r['perplexity']:.3f}",
                      "" if r is reference else f"{change:+.2%}", f"{r['bits_per_byte']:.4f}",
                      *[f"{r['tasks'].get(t, {}).get(k, float('nan')):.3f}" for t, k in tasks],
                      f"{r['decode_tokens_per_s'] or 0:.0f}", f"{r['quantize_s']:.1f}")
    console.print(table)
    console.print(f"checkpoints: {result.out}/<method>/ (mmctl eval and mmctl generate load them)")
