"""`mmctl eval`: score checkpoints on perplexity, multiple-choice and generation tasks, side by side.

lm-evaluation-harness's way of scoring (mmctl/evals/), on mmctl checkpoints or local Hugging Face ones, with no
conversion step and offline. Writes `results.json` (every metric with its standard error, per checkpoint and
task, the checkpoints' hashes, throughput) and `samples.jsonl` (every item: prompt, target, prediction, score).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmctl import recipe
from mmctl.artifacts import atomic_write_json, atomic_write_text
from mmctl.console import console
from mmctl.errors import UsageError
from mmctl.evals import ScoringConfig, score
from mmctl.evals.tasks import TaskConfig
from mmctl.recipe import option
from mmctl.runtime import RunConfig
from mmctl.stages import Job, Options, StageResult

STAGE = "eval"


@dataclass
class EvalRecipe:
    run: RunConfig = option(RunConfig("out/eval"), "output directory (results.json, samples.jsonl, manifest.json), "
                                                   "seed (of the few-shot example choice) and device")
    checkpoints: list[str] = option(list, "checkpoint directories (mmctl's, or local Hugging Face ones)")
    tasks: list[TaskConfig] = option(list, "the tasks (fields: mmctl/evals/tasks.py)")
    eval: ScoringConfig = option(ScoringConfig, "batching, limits and sampling")

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.checkpoints:
            problems.append(("checkpoints", "missing required value: at least one checkpoint directory"))
        if not self.tasks:
            from mmctl.evals.tasks import BUILTINS

            problems.append(("tasks", "missing required value: at least one task (on the command line, --task NAME: "
                                      f"a built-in — {', '.join(BUILTINS)} — or ppl / mc / gen / vqa with --data)"))
        labels = [t.label for t in self.tasks if t.builtin or t.data]
        if len(set(labels)) != len(labels):
            problems.append(("tasks", "two tasks share a name; give one a `name`"))
        return problems


def inputs(cfg: EvalRecipe) -> dict[str, Path]:
    """The checkpoints (each whole dir: weights, tokenizer, template) and the task files; every checkpoint is
    checked before anything is hashed or scored."""
    from mmctl import hf
    from mmctl.checkpoints import is_vlm

    for ckpt in cfg.checkpoints:
        hf.checkpoint_dir(ckpt)
        vqa = [t.label for t in cfg.tasks if t.task_kind == "vqa"]
        if vqa and not is_vlm(ckpt):
            raise UsageError(f"{ckpt}: not a vision-language model, and task {vqa[0]} asks about images (score "
                             "an `mmctl align-vision` output)")
    found = {f"checkpoint:{c}": Path(c) for c in cfg.checkpoints}
    for task in cfg.tasks:
        for path in (task.data, task.fewshot_data):
            if path:
                p = Path(path)
                found[f"task:{task.label}:{path}"] = p / "manifest.json" if p.is_dir() else p
    return found


def run(cfg: EvalRecipe, options: Options = Options()) -> StageResult:
    """Score every task on every checkpoint (or find the same evaluation finished)."""
    return Job(STAGE, cfg, options, inputs(cfg)).run(evaluate)


def evaluate(cfg: EvalRecipe, job: Job) -> dict:
    from mmctl import checkpoints
    from mmctl.evals.tasks import items_of
    from mmctl.models import fast_decode

    def load(ckpt: str):
        return checkpoints.load(ckpt, device=job.device, vision=True, quantized=True)

    # before the record begins, so a broken input fails with its error alone: the first checkpoint, the task files
    first = load(cfg.checkpoints[0])
    for task in cfg.tasks:
        if task.data and task.task_kind != "vqa" and not Path(task.data).is_dir():
            items_of(task)
    job.begin()
    results: dict = {"checkpoints": {}}
    samples: list[dict] = []
    for i, ckpt in enumerate(cfg.checkpoints):
        model, tok = first if i == 0 else load(ckpt)
        first = None
        fast_decode.fuse(model)  # generation tasks decode through the fast step (a language model with plain layers)
        chat = cfg.eval.chat if cfg.eval.chat is not None else checkpoints.is_chat_model(ckpt)
        entry = {"sha256": job.dir.inputs[f"checkpoint:{ckpt}"]["sha256"], "chat": chat, "tasks": {}}
        for task in cfg.tasks:
            stats: dict = {}
            metrics, task_samples = score(model, tok, task, cfg.eval, cfg.run.seed, stats, chat)
            metrics["throughput"] = throughput(stats)
            entry["tasks"][task.label] = metrics
            samples += [{"checkpoint": ckpt, "task": task.label, **s} for s in task_samples]
            console.print(f"{ckpt}: {task.label}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                               if isinstance(v, float) and not k.endswith("stderr")))
        results["checkpoints"][ckpt] = entry
    atomic_write_json(job.product("results.json"), {**results, "config": recipe.to_dict(cfg, STAGE)})
    # samples.jsonl is one of the record's logs: a failed run puts back the copy it found
    atomic_write_text(job.out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    return results


def task_from_flag(name: str, data: str | None) -> dict:
    """`--task` → a task mapping: a built-in, ppl/mc/gen over --data, or the fields of a task YAML file."""
    from mmctl.evals.tasks import BUILTINS

    kinds = {"ppl": "perplexity", "mc": "multiple_choice", "gen": "generation", "vqa": "vqa"}
    if name in BUILTINS:
        return {"builtin": name}
    if name in kinds:
        if not data:
            raise UsageError(f"--task {name} needs --data FILE")
        return {"kind": kinds[name], "data": data}
    if name.endswith((".yaml", ".yml")):  # checked as strictly as a recipe, with its own file and lines
        data, source = recipe.parse(recipe.read(name), name)
        recipe.build(TaskConfig, data, source)
        return data
    import difflib

    hint = difflib.get_close_matches(name, [*BUILTINS, *kinds], n=1, cutoff=0.6)
    raise UsageError(f"--task {name}: expected one of {', '.join(BUILTINS)}, ppl, mc, gen, vqa, or a task .yaml file"
                     + (f"; did you mean `{hint[0]}`?" if hint else ""))


def throughput(stats: dict) -> dict:
    out = {}
    if stats.get("seconds"):
        out["prefill_tokens_per_s"] = stats["tokens"] / stats["seconds"]
    for key in ("time_to_first_token_s", "decode_tokens_per_s"):
        if key in stats:
            out[key] = stats[key]
    return out


def render(result: StageResult) -> None:
    """One table: a row per task metric, a column per checkpoint."""
    from rich.table import Table

    results, out = result.results, result.out
    ckpts = list(results["checkpoints"])
    table = Table(title="Evaluation", title_justify="left")
    table.add_column("task")
    table.add_column("metric")
    for c in ckpts:
        table.add_column(c, justify="right")
    first = results["checkpoints"][ckpts[0]]["tasks"]
    for task, metrics in first.items():
        for metric, value in metrics.items():
            if not isinstance(value, float) or metric.endswith(("stderr", "chance")) or "@" in metric:
                continue
            table.add_row(task, metric, *[_cell(results["checkpoints"][c]["tasks"][task], metric) for c in ckpts])
        if "chance" in metrics:
            table.add_row(task, "chance", *[f"{metrics['chance']:.4g}"] * len(ckpts))
    console.print(table)
    for task, metrics in first.items():  # test-time compute: accuracy against the number of samples
        ns = [int(m.split("@")[1]) for m in metrics if m.startswith("pass@") and not m.endswith("stderr")]
        if not ns:
            continue
        table = Table(title=f"{task}: accuracy against N samples per item",
                      title_justify="left")
        table.add_column("N", justify="right")
        for c in ckpts:
            table.add_column(f"{c} pass@N", justify="right")
            table.add_column("maj@N", justify="right")
        for n in ns:
            table.add_row(str(n), *[_cell(results["checkpoints"][c]["tasks"][task], f"{kind}@{n}")
                                    for c in ckpts for kind in ("pass", "maj")])
        console.print(table)
    console.print(f"samples: {out / 'samples.jsonl'}")


def _cell(metrics: dict, metric: str) -> str:
    err, chance = metrics.get(f"{metric}_stderr"), metrics.get(f"{metric}_chance")  # chance: a vqa question type's
    return (f"{metrics[metric]:.4g}" + (f" ± {err:.2g}" if err == err and err is not None else "")
            + (f" (chance {chance:.2f})" if chance is not None else ""))
