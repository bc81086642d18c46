"""`mmctl report RUN_DIR…`: what a pipeline's runs did, in one place — read from the runs' files, never by re-running
a stage (`runs.py`). A table of the stages (finished, running, unfinished, not run) with each one's headline
number; the evaluation side by side (base → sft → rl → quantized); the VLM per question type; the quantization
table; figures (`figures.py`); the attention maps of the trained models (`attention.py`); and floors a pipeline's
numbers must clear (`floors.py`, for CI). The tables are `tables.py`'s."""

from __future__ import annotations

from pathlib import Path

from mmctl.report.runs import CURRICULUM, StageRun
from mmctl.report.tables import eval_table, quantize_rows, stage_summary


def build(found: list[StageRun], out: Path | None = None) -> dict:
    """The report's data (JSON-ready) from the runs `runs.find` found: stages, what was not run, the eval table
    (sample links relative to `out`), the VLM's scores per type, the quantization rows and every figure's series."""
    from mmctl.report import figures

    ran = {r.stage for r in found}
    vision = {r.name: r.results["evaluation"] for r in found if r.stage == "align-vision" and r.status == "finished"
              and isinstance(r.results.get("evaluation"), dict)
              and isinstance(r.results["evaluation"].get("per_type"), dict)}
    quant = {r.name: quantize_rows(r.results)[0] for r in found if r.stage == "quantize" and r.status == "finished"}
    return {"stages": [stage_summary(r) for r in found], "not_run": [s for s in CURRICULUM if s not in ran],
            "eval": eval_table(found, out), "vision": vision, "quantize": quant, "figures": figures.series(found)}


def run(paths: list[str | Path], out: Path, floors_file: Path | None = None, attention: bool = True,
        as_json: bool = False) -> dict:
    """Find the runs, write `out/report.md` and its figures, print the summary (or the JSON), then check the floors
    (every failed floor one line, exit 3) — the report is written either way, so a failure can be looked at."""
    from mmctl.artifacts import atomic_write_text
    from mmctl.console import console, emit_json
    from mmctl.errors import DataError
    from mmctl.report import figures, floors, runs, write

    checks = floors.read(floors_file) if floors_file else []  # a bad floors file fails before any work
    found = runs.find(paths)
    out.mkdir(parents=True, exist_ok=True)
    data = build(found, out)
    maps, notes = write.attention_maps(found) if attention else ({}, [])
    drawn = figures.draw(data["figures"], maps, out)
    data["floors"] = floors.check(checks, found)
    atomic_write_text(out / "report.md", write.markdown(data, drawn, notes, [str(p) for p in paths]))
    if as_json:
        emit_json(data)
    else:
        write.terminal(data, out / "report.md")
        from rich.markup import escape

        for result in data["floors"]:  # (escaped: a path like checkpoints[out/sft/model] is not markup)
            console.print(("[green]floor ok[/green]: " if result["ok"] else "[red]floor missed[/red]: ")
                          + escape(floors.describe(result)), soft_wrap=True, highlight=False)
    missed = [floors.describe(r) for r in data["floors"] if not r["ok"]]
    if missed:
        raise DataError(*[f"floor missed: {m}" for m in missed])
    return data
