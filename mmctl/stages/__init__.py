"""The pipeline stages, one file per `mmctl` subcommand, all of one shape:

    <Stage>Recipe          the recipe's dataclass (its sections: RunConfig, TrainConfig, …)
    inputs(cfg)            the files whose content decides the output (hashed into the manifest)
    run(cfg, options)      → StageResult: `Job(...).run(body)` — the body does the stage's work, the Job the rest
    render(result)         the human summary on stderr (`--json` prints `result.results` on stdout instead)

The `Job` below is the one lifecycle every stage shares: the output directory's lock and up-to-date check, the
process group, `--fresh` and resuming, the record a failed run must not cost (mmctl/artifacts.py's StageDir), the
training loop's session, and the manifest. Stages never import each other: what two stages share lives in the
library below them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmctl.artifacts import read_manifest
from mmctl.errors import UsageError


@dataclass(frozen=True)
class Options:
    """Command-line switches every stage understands (the recipe says what to do; these say how to run it)."""

    force: bool = False  # re-run even if the output directory is up to date
    fresh: bool = False  # training stages: discard the checkpoints and start from step 0
    force_resume: bool = False  # training stages: resume even if the model or data changed
    json: bool = False  # results go to stdout as JSON (so nothing else may be printed there)
    replace: bool = True  # a finished run of another recipe in the directory is replaced (False: refused)


@dataclass
class StageResult:
    out: Path | None  # the output directory (None for stages that write none, like generate)
    results: dict  # what the manifest records as results (and --json prints)
    up_to_date: bool = False  # a finished run with the same recipe and inputs was already there
    detail: Any = None  # in-memory objects render() needs beyond `results` (account's tables)


class Job:
    """One run of a stage in its output directory, from the up-to-date check to the manifest.

    `Job(stage, cfg, options, inputs).run(body)`: if a finished run with the same recipe and inputs is there, its
    results; otherwise `body(cfg, job)` does the work — validating its inputs before `job.begin()` (or the first
    `job.train()`) touches the record, writing products where `job.product(name)` says — and returns the results
    that `finish` records. A body that fails leaves the directory's record as it found it, unless it saved
    resumable training state (then re-running resumes, and the last finished run's record waits in `previous/`).

    distributed: join the process group `accelerate launch` describes (training stages); `shardable`: FSDP may
    shard the model; `computes`: the stage runs a model (it says on what, as it starts).
    """

    def __init__(self, stage: str, cfg, options: Options, inputs: dict[str, Path] | None = None, *,
                 distributed: bool = False, shardable: bool = False, computes: bool = True):
        from mmctl import recipe
        from mmctl.artifacts import StageDir
        from mmctl.runtime import Dist, pick_device, setup_distributed

        self.cfg, self.options, self.shardable = cfg, options, shardable
        device = getattr(cfg.run, "device", "auto")
        self.dist = setup_distributed(pick_device(device), shardable) if distributed else Dist(device=device)
        self.computes = computes
        self.dir = StageDir(cfg.run.out, stage, recipe.to_dict(cfg, stage), inputs=inputs, seed=cfg.run.seed,
                            lock=self.dist.main)
        self._checkpoints: dict[Path, int | None] = {}  # each checkpoint dir's newest step as the run began
        self._begun = False
        self._loggers = None  # TensorBoard / W&B, when a training section asks for them (mmctl/train/loggers.py)
        self.peak_flops = 0.0  # the device's measured matmul FLOP/s, when a training reports MFU
        self.saved_work = False  # set by a body that saved resumable work of its own (tokenize's checkpoints/)

    @property
    def out(self) -> Path:
        return self.dir.out

    @property
    def main(self) -> bool:
        return self.dist.main

    @property
    def device(self) -> str:
        """The device the stage computes on (`run.device`, `auto` resolved)."""
        from mmctl.runtime import pick_device

        if self.dist.device == "auto":
            self.dist.device = pick_device("auto")
        return self.dist.device

    def run(self, body: Callable[[Any, Job], dict]) -> StageResult:
        try:
            return self._run(body)
        finally:
            if self._loggers is not None:
                self._loggers.close()
            self.dir.release()

    def _run(self, body: Callable[[Any, Job], dict]) -> StageResult:
        if not self.options.force and self.dir.up_to_date():
            return StageResult(self.out, self.dir.results(), up_to_date=True)
        if not self.options.replace and read_manifest(self.out) is not None:
            raise UsageError(f"{self.out}: holds a finished `mmctl {self.dir.stage}` run of another recipe (other "
                             "checkpoints or tasks); --force replaces it, or give another output directory")
        try:
            results = body(self.cfg, self)
        except BaseException:
            if self.main and self.dir.abandon(self._saved_progress()):
                from mmctl.console import console

                console.print(f"note: {self.out} holds this run's resumable checkpoints now; the last finished "
                              f"run's record is in {self.out / 'previous'} and its products are untouched")
            raise
        if self.main:
            self.dir.finish(results, device=self.device)
        return StageResult(self.out, results if self.main else {})

    def begin(self, checkpoints: list[tuple[str, int]] = ()) -> None:
        """Start the run's record once the inputs are known good. `checkpoints`: the training's checkpoint dirs
        (relative to the output dir) and their steps, in order — `--fresh` empties them first, and the logs are
        kept up to the step a resumed run continues from (phases' steps add up)."""
        from mmctl.train import checkpoint

        dirs = [(self.out / d, steps) for d, steps in checkpoints]
        if self.options.fresh and self.main:
            for d, _ in dirs:
                checkpoint.prune(d, keep=0)
        self.dist.barrier()
        for d, _ in dirs:
            done = checkpoint.complete(d)
            self._checkpoints[d] = _step(done[0]) if done else None
        resume, offset = None, 0
        for d, steps in dirs:
            newest = self._checkpoints[d]
            if newest is None:
                break
            resume = offset + newest
            if newest < steps:
                break
            offset += steps
        if self.main:
            self.dir.begin(keep_logs_through=resume)
            if names := [n for t in _trainings(self.cfg) for n in t.loggers]:
                from mmctl.train.loggers import Loggers

                self._loggers = Loggers(names, self.out, self.dir.stage, self.dir.recipe,
                                        (self.out / "recipe.yaml").read_text(encoding="utf-8"), resume)
            if self.computes:  # said once the inputs are known good: a refused run prints only its error
                from mmctl.runtime import announce

                self.device  # noqa: B018 - `auto` resolved before it is announced
                announce(self.dist)
        self._begun = True

    def train(self, parts, cfg, optim, precision: str, checkpoints: str = "checkpoints",
              log: Callable[[dict], None] | None = None) -> dict:
        """`parts` (mmctl/train/loop.py's Parts) on the one loop with `cfg` (TrainConfig) and `optim`, its
        checkpoints in `<out>/<checkpoints>`; the record begins here if the stage has not begun it."""
        from mmctl.runtime import peak_flops
        from mmctl.train.loop import Session, train

        if not self._begun:
            self.begin([(checkpoints, cfg.steps)])
        if parts.flops_per_token:
            self.peak_flops = peak_flops(self.device, precision)
        session = Session(self.out / checkpoints, log or self.log, self.dist, precision,
                          self.options.force_resume, self.shardable, self.peak_flops)
        return train(parts, cfg, optim, session)

    def product(self, name: str) -> Path:
        """Where to write product `name`; it replaces `<out>/<name>` when the run finishes."""
        return self.dir.product(name)

    def log(self, record: dict, to: str = "metrics.jsonl") -> None:
        """Append `record` to the run's log `to` (and send it to the recipe's loggers)."""
        self.dir.log(record, to)
        if self._loggers is not None:
            self._loggers.log(record, to)

    def _saved_progress(self) -> bool:
        """Whether the run saved a checkpoint newer than the ones its directories held as it began (or other
        resumable work)."""
        from mmctl.train import checkpoint

        if self.saved_work:
            return True
        for d, before in self._checkpoints.items():
            done = checkpoint.complete(d)
            if done and _step(done[0]) != before:
                return True
        return False


def _trainings(cfg) -> list:
    """Every training section (TrainConfig) of a recipe: `train`, or each align-vision phase's."""
    from mmctl.train.loop import TrainConfig

    if isinstance(cfg, TrainConfig):
        return [cfg]
    if isinstance(cfg, list):
        return [t for item in cfg for t in _trainings(item)]
    if dataclasses.is_dataclass(cfg):
        return [t for f in dataclasses.fields(cfg) for t in _trainings(getattr(cfg, f.name))]
    return []


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])
