"""The pipeline stages, one file per `mmctl` subcommand, all of one shape:

    <Stage>Config          the recipe's dataclass; its `run:` section is a `mmctl.runtime.RunConfig`
    run(cfg, options)      → StageResult: do the work (or find it up to date) and write the output directory
    render(result)         the human summary on stderr (`--json` prints `result.results` on stdout instead)

Stages never import each other: what two stages share lives in the library below them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Options:
    """Command-line switches every stage understands (the recipe says what to do; these say how to run it)."""

    force: bool = False  # re-run even if the output directory is up to date
    fresh: bool = False  # training stages: discard the checkpoints and start from step 0
    force_resume: bool = False  # training stages: resume even if the model or data changed
    json: bool = False  # results go to stdout as JSON (so nothing else may be printed there)


@dataclass
class StageResult:
    out: Path | None  # the output directory (None for stages that write none, like generate)
    results: dict  # what the manifest records as results (and --json prints)
    up_to_date: bool = False  # a finished run with the same recipe and inputs was already there
    detail: Any = None  # in-memory objects render() needs beyond `results` (account's tables)
