"""The report's outputs: `report.md` with its figures beside it, and the terminal summary (rich tables on a
terminal, plain lines elsewhere)."""

from __future__ import annotations

import time
from pathlib import Path

from mmctl.report.runs import StageRun
from mmctl.report.tables import change, number, quantize_rows


def attention_maps(found: list[StageRun]) -> tuple[dict, list[str]]:
    """({language: {run: maps}, vision: {run: examples}}, notes): the pretrained model's and the first sft
    model's attention on their sample prompts, and the first VLM's on held-out shapes questions. A model that
    does not load is a note, not a failure: the report is still written."""
    from mmctl.errors import MmctlError
    from mmctl.report import attention

    maps, notes = {"language": {}, "vision": {}}, []
    picks = [next((r for r in found if r.stage == s and r.status == "finished" and (r.path / "model").is_dir()), None)
             for s in ("pretrain", "sft", "align-vision")]
    for run in filter(None, picks):
        try:
            if run.stage == "align-vision":
                maps["vision"][run.name] = attention.vision_language_model(run.path / "model")
            else:
                prompt = (run.recipe.get("eval") or {}).get("sample_prompt") or "Once upon a time"
                maps["language"][run.name] = attention.language_model(run.path / "model", prompt)
        except (MmctlError, OSError, ValueError, RuntimeError) as e:
            notes.append(f"attention of {run.name} not drawn: {e}")
    return maps, notes


def markdown(data: dict, figures: list[tuple[str, str]], notes: list[str], sources: list[str]) -> str:
    lines = ["# mmctl report", "",
             f"From {', '.join(f'`{s}`' for s in sources)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             "Read from the runs' manifest.json and metrics.jsonl; nothing was re-run.", "",
             "## Stages", "", "| stage | run | status | time | headline |", "|---|---|---|---|---|"]
    for s in data["stages"]:
        lines.append(f"| {s['stage']} | `{s['run']}` | {s['status']} | {_duration(s['seconds'])} | "
                     f"{_cell(s['headline'])} |")
    lines += [f"| {stage} | | not run | | |" for stage in data["not_run"]]
    table = data["eval"]
    if table["rows"]:
        lines += ["", "## Evaluation, side by side", "",
                  "Each cell: the task's headline metric (exact match, multiple-choice accuracy, or bits per byte "
                  "for perplexity tasks — lower is better) ± its standard error; a guess's score beside a "
                  "multiple-choice task's name, and a generation task's score per group of items (arithmetic: "
                  "per operation) in the column after it — then, where answers were sampled (`eval.samples`), "
                  "pass@1 and pass@N: the chance that one sampled answer, or any of N, is right.", "",
                  "| checkpoint | stage | " + " | ".join(_headers(table)) + " | samples |",
                  "|---|---|" + "---|" * len(_headers(table)) + "---|"]
        grouped, sampled = _grouped(table), _sampled(table)
        for row in table["rows"]:
            cells = []
            for task in table["columns"]:
                cells.append(_score(row["cells"].get(task)))
                if task in grouped:
                    cells.append(_in_order(row["groups"].get(task), grouped[task]))
                if task in sampled:
                    cells.append(_in_order(row["sampled"].get(task), sampled[task]))
            link = f"[samples]({row['samples']})" if row["samples"] else ""
            lines.append(f"| {row['label']} | {row['stage']} | " + " | ".join(cells) + f" | {link} |")
    for run, e in data["vision"].items():
        if not e:
            continue
        blind = e.get("question_only") if isinstance(e.get("question_only"), dict) else {}
        blind = blind.get("per_type") if isinstance(blind.get("per_type"), dict) else {}
        lines += ["", f"## The VLM per question type ({run})", "",
                  "| type | accuracy | question-only (another image) | chance |", "|---|---|---|---|"]
        lines += [f"| {t} | {number(v.get('accuracy'), '.2f')} | {number(blind.get(t), '.2f')} | "
                  f"{number(v.get('chance'), '.2f')} |" for t, v in e["per_type"].items() if isinstance(v, dict)]
        lines += ["", "Hallucination rate (\"yes\" to an object that is not there): "
                  f"{number(e.get('hallucination_rate'), '.2f')}; accuracy on unseen colour–kind pairs: "
                  f"{number(e.get('composition_accuracy'), '.2f')}."]
        if isinstance(e.get("probe"), dict):
            p = e["probe"]
            lines += ["", "A linear probe on the ViT's features (what the encoder holds, fresh scenes): cell colour "
                      f"{number(p.get('cell_colour'), '.2f')}, cell shape {number(p.get('cell_shape'), '.2f')}, "
                      f"count {number(p.get('count'), '.2f')}."]
    for run, rows in data["quantize"].items():
        if not rows:
            continue
        _, base = quantize_rows({"rows": rows})
        lines += ["", f"## Quantization ({run})", "", "| method | MiB on disk | bits / weight | perplexity | Δ | "
                  "decode tok/s |", "|---|---|---|---|---|---|"]
        for r in rows:
            delta = "" if r is base or change(r, base) is None else format(change(r, base), "+.2%")
            lines.append(f"| {r.get('name')} | {number((r.get('bytes') or 0) / 2**20, '.2f')} | "
                         f"{number(r.get('bits'), '.2f')} | {number(r.get('perplexity'), '.4f')} | {delta} | "
                         f"{number(r.get('decode_tokens_per_s'), '.0f')} |")
    if figures:
        lines += ["", "## Figures"]
        for title, name in figures:
            lines += ["", f"### {title}", "", f"![{title}]({name})"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def terminal(data: dict, report: Path | None) -> None:
    """The stages and the evaluation on stderr: rich tables on a terminal, plain lines off one (logs, CI)."""
    from rich.table import Column, Table

    from mmctl.console import console

    table = data["eval"]
    if console.is_terminal:
        stages = Table("stage", "run", "status", "time", "headline", title="mmctl report")
        for s in data["stages"]:
            stages.add_row(s["stage"], s["run"], s["status"], _duration(s["seconds"]), s["headline"])
        for stage in data["not_run"]:
            stages.add_row(stage, "", "not run", "", "")
        console.print(stages)
        if table["rows"]:
            label = Column("checkpoint", min_width=max(len(r["label"]) for r in table["rows"]))  # never cut
            scores = Table(label, "stage", *table["columns"], title="evaluation (± in report.md)")
            for row in table["rows"]:
                scores.add_row(row["label"], row["stage"],
                               *[_score(row["cells"].get(t), stderr=False) for t in table["columns"]])
            console.print(scores)
    else:
        for s in data["stages"]:
            console.print(f"{s['stage']:<13} {s['status']:<10} {_duration(s['seconds']):>7}  {s['run']}: "
                          f"{s['headline']}", soft_wrap=True, highlight=False)
        for stage in data["not_run"]:
            console.print(f"{stage:<13} not run", highlight=False)
        for row in table["rows"]:
            console.print(f"eval {row['label']}: " + ", ".join(f"{t} {_score(c)}" for t, c in row["cells"].items()),
                          soft_wrap=True, highlight=False)
    if report is not None:
        console.print(f"wrote: {report}")


def _duration(seconds) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _grouped(table: dict) -> dict[str, list[str]]:
    """The tasks some checkpoint has per-group scores for, and their groups (sorted)."""
    groups = {t: sorted({g for row in table["rows"] for g in row["groups"].get(t) or {}}) for t in table["columns"]}
    return {t: names for t, names in groups.items() if names}


def _sampled(table: dict) -> dict[str, list[str]]:
    """The tasks some checkpoint has sampled answers for, and the pass@k shown: pass@1 and the largest k."""
    out = {}
    for task in table["columns"]:
        ks = {int(m.removeprefix("pass@")) for row in table["rows"] for m in row["sampled"].get(task) or {}}
        if ks:
            out[task] = [f"pass@{k}" for k in sorted({min(ks), max(ks)})]
    return out


def _headers(table: dict) -> list[str]:
    """Each task's column (with a guess's score, when it has one), and its per-group and pass@k columns if it has
    them."""
    headers, grouped, sampled = [], _grouped(table), _sampled(table)
    for task in table["columns"]:
        chance = table["chance"].get(task)
        headers.append(task + (f" (chance {chance:.2f})" if chance is not None else ""))
        if task in grouped:
            headers.append(f"{task}: {' / '.join(grouped[task])}")
        if task in sampled:
            headers.append(f"{task} sampled: {' / '.join(sampled[task])}")
    return headers


def _in_order(scores: dict | None, names: list[str]) -> str:
    """Scores in the header's order: "0.61 / 0.47 / 0.29" (empty where a checkpoint has none)."""
    return " / ".join(number(scores.get(g), ".2f") for g in names) if scores else ""


def _score(cell, stderr: bool = True) -> str:
    if cell is None:
        return ""
    value, error, _ = cell
    return number(value, ".3f") + (f" ± {error:.3f}" if stderr and isinstance(error, int | float) and error else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
