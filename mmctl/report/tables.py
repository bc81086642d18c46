"""The report's tables, as data: each stage's headline, the evaluation side by side, the quantization rows (what
report.md, the terminal summary and `--json` show; figures.py draws, write.py writes)."""

from __future__ import annotations

from pathlib import Path

from mmctl.report.runs import CURRICULUM, StageRun, lookup


def stage_summary(run: StageRun) -> dict:
    """{stage, run, status, seconds, headline, metrics}: the number that says whether the stage worked."""
    r, metrics = run.results, {}
    final = r.get("final") if isinstance(r.get("final"), dict) else {}
    if run.status == "unreadable":
        return _row(run, run.problem, metrics)
    if run.status != "finished":
        last = run.training()[-1] if run.training() else None
        at = f"step {last['step']} (loss {number(last['loss'])})" if last else None
        headline = ((f"at {at}" if at else "started") if run.status == "running" else
                    f"stopped at {at}" if at else "stopped before logging a step")
        return _row(run, headline, metrics)
    if run.stage == "account":
        metrics = {"parameters": r.get("params.total")}
    elif run.stage == "tokenize":
        metrics = {"bytes_per_token": r.get("bytes_per_token"), "vocab_size": lookup(r, "tokenizer.vocab_size")}
    elif run.stage in ("pretrain", "sft"):
        metrics = {"val_loss": final.get("val_loss"), "val_bpb": final.get("val_bpb"), "sample": final.get("sample")}
    elif run.stage == "rl":
        keys = ("val_accuracy", "val_reward") if r.get("algorithm") == "grpo" else (
            "val_rewards/accuracies", "val_rewards/margins")
        metrics = {k: final.get(k) for k in keys} | {"sample": final.get("sample")}
    elif run.stage == "align-vision":
        e = r.get("evaluation") if isinstance(r.get("evaluation"), dict) else {}
        metrics = {"accuracy": e.get("accuracy"), "hallucination_rate": e.get("hallucination_rate"),
                   "composition_accuracy": e.get("composition_accuracy")}
    elif run.stage == "quantize":
        rows, base = quantize_rows(r)
        metrics = {str(row.get("name")): change(row, base) for row in rows if row is not base}
    elif run.stage == "eval":
        checkpoints = r.get("checkpoints") if isinstance(r.get("checkpoints"), dict) else {}
        metrics = {"checkpoints": len(checkpoints),
                   "tasks": len({t for c in checkpoints.values() if isinstance(c, dict) for t in c.get("tasks") or {}})}
    return _row(run, _headline(run.stage, metrics), metrics)


def quantize_rows(results: dict) -> tuple[list[dict], dict | None]:
    """A quantize run's rows (those that are dicts) and its unquantized row (method none), if it has one."""
    rows = [row for row in results.get("rows") or [] if isinstance(row, dict)]
    return rows, next((row for row in rows if row.get("method") == "none"), None)


def change(row: dict, base: dict | None) -> float | None:
    """A quantized row's perplexity against the unquantized one's, as a fraction (+0.01 = 1% worse)."""
    try:
        return row["perplexity"] / base["perplexity"] - 1
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def number(value, fmt: str = ".3f") -> str:
    """A value for a table cell: formatted if it is a number, else a dash."""
    return format(value, fmt) if isinstance(value, int | float) else "—"


def _row(run: StageRun, headline: str, metrics: dict) -> dict:
    return {"stage": run.stage, "run": str(run.path), "status": run.status, "seconds": run.seconds,
            "headline": headline, "metrics": metrics}


def _headline(stage: str, m: dict) -> str:
    def num(v):
        if isinstance(v, str):
            return repr(v if len(v) <= 60 else v[:57] + "…")
        return f"{v:,}" if isinstance(v, int) else format(v, ".3f") if isinstance(v, float) else str(v)

    if stage == "quantize":
        return ", ".join(f"{k} {'—' if v is None else format(v, '+.2%')}" for k, v in m.items()) + \
            " perplexity vs unquantized"
    if stage == "eval":
        return f"{m['checkpoints']} checkpoints × {m['tasks']} tasks"
    parts = [f"{k.replace('_', ' ')} {num(v)}" for k, v in m.items() if v is not None]
    return ", ".join(parts)


def eval_table(runs: list[StageRun], relative_to: Path | None = None) -> dict:
    """Every finished eval run's scores merged: {columns: [task], chance: {task: chance}, rows: [{checkpoint,
    label, stage, cells: {task: (value, stderr, metric)}, groups: {task: {group: value}}, sampled: {task: {"pass@k":
    value}}, samples}]}, the checkpoints in curriculum order (base → sft → rl → quantized)."""
    made_by = {run.path.resolve(): run.stage for run in runs}
    rows, columns, chance = {}, [], {}
    for run in runs:
        if run.stage != "eval" or run.status != "finished":
            continue
        samples = run.path / "samples.jsonl"
        checkpoints = run.results.get("checkpoints")
        for checkpoint, scored in (checkpoints if isinstance(checkpoints, dict) else {}).items():
            if "\x00" in checkpoint:  # a path no file system has: not a checkpoint eval scored
                continue
            row = rows.setdefault(checkpoint, {"checkpoint": checkpoint, "label": _label(checkpoint),
                                               "stage": _stage_of(checkpoint, run.path, made_by), "cells": {},
                                               "groups": {}, "sampled": {},
                                               "samples": _relative(samples, relative_to) if samples.is_file()
                                               else None})
            tasks = scored.get("tasks") if isinstance(scored, dict) else None
            for task, result in (tasks if isinstance(tasks, dict) else {}).items():
                metric = next((m for m in ("exact_match", "acc", "accuracy", "bits_per_byte")
                               if isinstance(result, dict) and m in result), None)
                if metric is None:
                    continue
                passes = {m: v for m, v in result.items() if m.startswith("pass@") and not m.endswith("_stderr")}
                if passes and task not in row["sampled"]:  # answers sampled beside the greedy one (eval.samples)
                    row["sampled"][task] = passes
                if task in row["cells"]:  # a checkpoint two evals scored: the first run's cell
                    continue
                row["cells"][task] = (result[metric], result.get(f"{metric}_stderr"), metric)
                groups = result.get("groups")
                if isinstance(groups, dict):
                    row["groups"][task] = {str(g): v.get(metric) for g, v in groups.items() if isinstance(v, dict)}
                if isinstance(result.get("chance"), int | float):
                    chance.setdefault(task, result["chance"])
                if task not in columns:
                    columns.append(task)
    order = {stage: i for i, stage in enumerate(CURRICULUM)}
    ordered = sorted(rows.values(), key=lambda r: order.get(r["stage"], len(order)))
    return {"columns": columns, "chance": chance, "rows": ordered}


def _label(checkpoint: str) -> str:
    p = Path(checkpoint)
    return p.parent.name if p.name == "model" else f"{p.parent.name}/{p.name}"


def _stage_of(checkpoint: str, eval_dir: Path, made_by: dict) -> str:
    """The stage that wrote a checkpoint: the run dir holding it (checkpoint paths are relative to where eval ran,
    which is the run dirs' parent's parent in a recipes dir)."""
    for base in (Path.cwd(), eval_dir.parent.parent, eval_dir.parent):
        p = (base / checkpoint).resolve()
        for candidate in (p.parent, p.parent.parent):
            if candidate in made_by:
                return made_by[candidate]
    return "?"


def _relative(path: Path, to: Path | None) -> str:
    import os

    return os.path.relpath(path, to) if to is not None else str(path)
