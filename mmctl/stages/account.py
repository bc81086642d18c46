"""`mmctl account`: what does this model cost — parameters, FLOPs, memory, time — before you run it.

The target is a preset name (`llama-7b`), a Hugging Face config.json (or a directory holding one, such as a
checkpoint dir), or an account recipe. All three become one `AccountRecipe`; command-line flags are overrides
of its fields, so they are validated like the recipe is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmctl import presets, recipe
from mmctl.accounting import SECTIONS, Arch, Line, Workload, account, fit, from_hf_config, nest
from mmctl.artifacts import atomic_write_json
from mmctl.errors import DataError, UsageError
from mmctl.models.config import ModelConfig
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult
from mmctl.train.loop import TrainConfig

STAGE = "account"
JSON_SCHEMA = "mmctl.account/1"


@dataclass
class ModelSection:
    preset: str | None = option(None, "a named architecture (`mmctl account --list`)")
    config: str | None = option(None, "a Hugging Face config.json, or a directory holding one (a checkpoint)")
    hf: dict = option(dict, "config.json fields written inline (model_type, hidden_size, …)")

    def check(self) -> list[tuple[str, str]]:
        given = [name for name in ("preset", "config", "hf") if getattr(self, name)]
        if not given:
            return [("preset", "missing required value: set one of model.preset, model.config or model.hf")]
        if len(given) > 1:
            return [(given[1], f"conflicts with model.{given[0]}: set only one of model.preset, model.config, "
                               "model.hf")]
        if self.preset and self.preset not in presets.model_names():
            hint = presets.did_you_mean(self.preset, presets.model_names())
            return [("preset", f"unknown preset {self.preset!r}{hint}; `mmctl account --list` shows them")]
        return []


@dataclass
class TrainSection:
    seq_len: int = option(2048, "context length T in tokens (at most 2^31)", ge=1, le=2**31)
    batch_size: int = option(1, "sequences per GPU per micro-step (activations and KV cache scale with it)", ge=1,
                            le=2**31)
    tokens: float | None = option(None, "training tokens D; unset: Chinchilla-optimal 20·N (at most 1e18, ~10^5 "
                                               "times the largest published runs)", gt=0, le=1e18)
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16-true"] = option(
        "bf16-mixed", "fp32 | bf16-mixed / fp16-mixed (16-bit compute, fp32 master weights) | bf16-true")
    zero: int = option(0, "ZeRO stage over the GPUs: 0 none, 1 optimizer states, 2 + gradients, 3 + weights",
                       ge=0, le=3)
    activation_checkpointing: Literal["none", "selective", "full"] = option(
        "none", "none | selective (recompute attention scores) | full (recompute each layer)")
    attention: Literal["flash", "eager"] = option(
        "flash", "flash: fused kernels keep no T×T scores | eager: scores kept for the backward pass")


@dataclass
class HardwareSection:
    gpu: str = option("h100-sxm", "accelerator preset (`mmctl account --list`)")
    num_gpus: int = option(1, "data-parallel GPUs (at most 2^24)", ge=1, le=2**24)
    mfu: float = option(0.4, "model FLOPs utilization assumed for the time estimate", gt=0, le=1)

    def check(self) -> list[tuple[str, str]]:
        if self.gpu not in presets.hardware():
            hint = presets.did_you_mean(self.gpu, list(presets.hardware()))
            return [("gpu", f"unknown GPU {self.gpu!r}{hint}; `mmctl account --list` shows them")]
        return []


@dataclass
class AccountRecipe:
    run: RunConfig = option(RunConfig, "where results go: unset out prints only; set, account.json and "
                                       "manifest.json are written there")
    model: ModelSection = option(ModelSection, "the architecture to account for")
    train: TrainSection = option(TrainSection, "the workload: context, batch, tokens, precision, memory savers")
    hardware: HardwareSection = option(HardwareSection, "the accelerators and the utilization assumed")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.train.zero and self.hardware.num_gpus == 1:
            problems.append(("train.zero", f"ZeRO stage {self.train.zero} shards over GPUs; it needs "
                                           "hardware.num_gpus > 1"))
        spec = presets.hardware().get(self.hardware.gpu)
        dtype = {"fp32": "fp32", "fp16-mixed": "fp16"}.get(self.train.precision, "bf16")
        if spec and dtype not in spec["peak_flops"]:
            problems.append(("train.precision", f"{self.train.precision} needs {dtype}, which "
                                                f"{self.hardware.gpu} does not have; try fp16-mixed"))
        return problems


def load_config(target: str, overrides: list[str]) -> AccountRecipe:
    """`mmctl account TARGET [flags]` → AccountRecipe. TARGET is a preset name, a config.json (or a directory
    holding one), an account recipe, or a training recipe (its model, context and micro-batch); `overrides` (the
    flags', then --set's) apply over what TARGET selects."""
    path = Path(target)
    selects: list[str] | None
    if path.suffix in (".yaml", ".yml"):
        data, source = recipe.parse(recipe.read(path), str(path))
        selects = None if data.get("stage") in (None, STAGE) else _training_recipe(data, source)
    elif path.suffix == ".json" or path.is_dir() or "/" in target:
        selects = [f"model.config={json.dumps(target, ensure_ascii=False)}"]
    elif target not in presets.model_names():
        raise UsageError(f"account: {target!r} is not a model preset, a config.json (or a directory holding one) or a "
                         f"recipe{presets.did_you_mean(target, presets.model_names())} (`mmctl account --list` shows "
                         "the presets)")
    else:
        selects = [f"model.preset={json.dumps(target, ensure_ascii=False)}"]
    overrides = (selects or []) + list(overrides)
    if selects is None:
        return recipe.load(path, AccountRecipe, overrides, stage=STAGE)
    return recipe.build(AccountRecipe, {}, recipe.Source("(command line)", {}, set()), overrides, stage=STAGE)


@dataclass
class _TrainingRecipe:
    """The two sections of a training recipe that account reads (the rest is the stage's business)."""

    model: ModelConfig = option(ModelConfig, "the architecture")
    train: TrainConfig = option(TrainConfig, "the run's context, batch and precision")


def _training_recipe(data: dict, source: recipe.Source) -> list[str]:
    """Overrides that make account describe a training recipe's model, context and micro-batch."""
    if "model" not in data:
        raise UsageError(f"{source.file}: a `mmctl {data.get('stage')}` recipe has no model section to account for")
    cfg = recipe.build(_TrainingRecipe, {"model": data["model"], "train": data.get("train", {})}, source)
    return [f"model.hf={json.dumps(cfg.model.to_hf())}"] + [
        f"train.{key}={json.dumps(value)}" for key, value in cfg.train.workload().items()]


def resolve_arch(model: ModelSection) -> tuple[Arch, Path | None]:
    """The architecture, and the file it was read from (an input to hash) if any."""
    if model.preset:
        return from_hf_config(presets.load_model(model.preset)["config"], model.preset, "preset config"), \
            presets.model_path(model.preset)
    if model.hf:
        return from_hf_config(model.hf, f"inline {model.hf.get('model_type', 'model')}", "model.hf"), None
    path = Path(model.config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise DataError(f"{path}: config.json not found")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DataError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    name = path.parent.name if path.name == "config.json" else path.stem
    return from_hf_config(config, name or "model", str(path)), path


def run(cfg: AccountRecipe, options: Options = Options(), verify: bool = False) -> StageResult:
    """Account for the model under the workload (and with `verify`, check the numbers against transformers and
    torch's FLOP counter); if run.out is set, write account.json and the manifest."""
    arch, source = resolve_arch(cfg.model)
    t, h = cfg.train, cfg.hardware
    workload = Workload(seq_len=t.seq_len, batch_size=t.batch_size, tokens=t.tokens, precision=t.precision,
                        zero=t.zero, num_gpus=h.num_gpus, activation_checkpointing=t.activation_checkpointing,
                        attention=t.attention)
    sections = account(arch, workload, h.gpu, presets.load_hardware(h.gpu), h.mfu)
    stored = on_disk(source)
    if stored:
        sections["Inference memory"].insert(0, stored)
    results = to_json(sections, arch, cfg)
    results["fit"] = fit(arch, workload, presets.load_hardware(h.gpu))
    checks = None
    if verify:
        from mmctl.accounting.verify import verify as run_checks

        checks = run_checks(arch, sections, cfg.train.seq_len)
        results["verify"] = [c.__dict__ for c in checks]
    up_to_date = False
    if cfg.run.out:
        def write(cfg: AccountRecipe, job: Job) -> dict:
            job.begin()
            atomic_write_json(job.product("account.json"), results)
            return {"params.total": results["params"]["total"], "params.active": results["params"]["active"]}

        up_to_date = Job(STAGE, cfg, options, {"model": source} if source else {}, computes=False).run(write).up_to_date
    return StageResult(Path(cfg.run.out) if cfg.run.out else None, results, up_to_date,
                       detail={"sections": sections, "arch": arch, "checks": checks})


def on_disk(config: Path | None) -> Line | None:
    """The weights a checkpoint dir actually stores (its *.safetensors files), with how they are stored — its
    `quantization_config` (mmctl's packed codes, bitsandbytes' NF4) or its dtype — or None for a lone config."""
    if config is None or config.name != "config.json" or not any(config.parent.glob("*.safetensors")):
        return None
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    q = fields.get("quantization_config") if isinstance(fields, dict) else None
    if isinstance(q, dict) and q.get("quant_method") == "mmctl":
        how = f"{q.get('method')} {q.get('bits')}-bit" + (f" g{q['group_size']}" if q.get("group_size") else "")
    elif isinstance(q, dict) and q.get("quant_method") == "bitsandbytes":
        how = "bitsandbytes " + ("int8" if q.get("load_in_8bit") else str(q.get("bnb_4bit_quant_type", "4-bit")))
    else:
        how = str(fields.get("torch_dtype", "as stored")) if isinstance(fields, dict) else "as stored"
    size = sum(f.stat().st_size for f in config.parent.glob("*.safetensors"))
    return Line("memory.inference.weights.on_disk", f"weights on disk ({how})", size, "bytes",
                "the checkpoint's *.safetensors files (headers included)", str(config.parent))


def disagrees(result: StageResult) -> bool:
    """True if --verify found a number that disagrees with its reference."""
    return any(c.ok is False for c in result.detail["checks"] or [])


def to_json(sections: dict[str, list[Line]], arch: Arch, cfg: AccountRecipe) -> dict:
    """The documented `--json` object (docs/account.md: "mmctl account --json")."""
    body = nest([line for lines in sections.values() for line in lines])
    return {
        "schema": JSON_SCHEMA,
        "model": {"name": arch.name, "family": arch.family},
        "workload": {"seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
                     "tokens": body["flops"]["tokens"],
                     "precision": cfg.train.precision, "zero": cfg.train.zero,
                     "activation_checkpointing": cfg.train.activation_checkpointing,
                     "attention": cfg.train.attention, "gpu": cfg.hardware.gpu,
                     "num_gpus": cfg.hardware.num_gpus, "mfu": cfg.hardware.mfu},
        **body,
    }


def render(result: StageResult, explain: bool = False) -> None:
    """Rich tables on the console (stderr), one per section, then the --verify checks if any."""
    from rich.table import Table

    from mmctl.console import console

    sections, arch = result.detail["sections"], result.detail["arch"]
    console.print(f"[bold]{arch.name}[/bold] ({arch.family}): d={arch.hidden_size} L={arch.num_layers} "
                  f"H={arch.num_heads} K={arch.num_kv_heads} Dh={arch.head_dim} F={arch.intermediate_size} "
                  f"V={arch.vocab_size}" + (f" E={arch.num_experts} k={arch.experts_per_token}"
                                            if arch.num_experts else ""))
    for title in SECTIONS:
        table = Table(title=title, title_justify="left", show_header=explain)
        table.add_column("quantity")
        table.add_column("value", justify="right")
        if explain:
            table.add_column("formula", overflow="fold")
            table.add_column("source", overflow="fold")
        for line in sections[title]:
            row = [line.label, human(line.value, line.unit)]
            table.add_row(*(row + [line.formula, line.source] if explain else row))
        console.print(table)
    fits = result.results["fit"]
    if not fits["fits"]:
        workload = result.results["workload"]
        said = (f"{human(fits['peak_bytes'], 'bytes')} per GPU at its training peak, more than the "
                f"{human(fits['gpu_bytes'], 'bytes')} a {workload['gpu']} has")
        remedy = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (fits["with"] or {}).items())
        console.print(f"[yellow]does not fit:[/yellow] {said}; " + (
            f"it would with {remedy} ({human(fits['peak_with'], 'bytes')} per GPU)" if fits["with"] else
            "not even with ZeRO-3, activation checkpointing and 4,096 GPUs: shorten the context or the micro-batch"))
    if result.detail["checks"] is not None:
        render_checks(result.detail["checks"])


def render_checks(checks) -> None:
    from rich.markup import escape
    from rich.table import Table

    from mmctl.console import console

    table = Table(title="Self-check (--verify)", title_justify="left")
    for col in ("check", "mmctl", "reference", "result", "how"):
        table.add_column(col)
    for c in checks:
        result = {True: "[green]agree[/green]", False: "[red]DISAGREE[/red]", None: "—"}[c.ok]
        table.add_row(c.name, "—" if c.mmctl is None else f"{c.mmctl:,.0f}",
                      "—" if c.reference is None else f"{c.reference:,.0f}", result, escape(c.note))
    console.print(table)


def human(value: float, unit: str) -> str:
    if unit == "params":
        return f"{int(value):,}" + (f" ({value / 1e9:.2f}B)" if value >= 1e9 else
                                    f" ({value / 1e6:.1f}M)" if value >= 1e6 else "")
    if unit == "bytes":
        for size, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= size:
                return f"{value / size:.2f} {name}"
        return f"{value:.0f} B"
    if unit in ("FLOP", "FLOP/s", "tokens"):
        return f"{value:.3e} {unit}"
    if unit == "s":
        days = value / 86400
        return f"{value:,.0f} s ({days:.1f} days)" if days >= 1 else f"{value:,.1f} s ({value / 3600:.2f} h)"
    if unit == "hours":
        return f"{value:,.1f} h"
    return f"{value:.4g}" + (f" {unit}" if unit not in ("ratio",) else "")


def list_presets() -> None:
    from rich.table import Table

    from mmctl.console import console

    table = Table(title="Model presets (mmctl account NAME)", title_justify="left")
    for col in ("name", "family", "description", "source"):
        table.add_column(col)
    for name in presets.model_names():
        p = presets.load_model(name)
        table.add_row(name, p["config"]["model_type"], p["description"], p["source"])
    console.print(table)
    gpus = Table(title="Hardware presets (--gpu NAME; dense peak FLOP/s)", title_justify="left")
    for col in ("name", "description", "bf16", "fp32", "memory", "bandwidth"):
        gpus.add_column(col)
    for name, spec in presets.hardware().items():
        peak = spec["peak_flops"]
        gpus.add_row(name, spec["description"], f"{peak.get('bf16', 0) / 1e12:g} TFLOP/s" if "bf16" in peak else "—",
                     f"{peak['fp32'] / 1e12:g} TFLOP/s" if "fp32" in peak else "—", f"{spec['memory_gb']} GB",
                     f"{spec['bandwidth'] / 1e12:g} TB/s")
    console.print(gpus)
