"""Training logs beside metrics.jsonl, for the tools people already watch curves in: TensorBoard and W&B.

A recipe's `train.loggers: [tensorboard, wandb]` turns them on. Every record a run appends to metrics.jsonl is sent
with the same names and values (numbers as scalars at the record's step, text as text); records of samples.jsonl
as text; the resolved recipe as hyper-parameters. metrics.jsonl stays the record the report reads: a logger is a
view of it.

- TensorBoard writes event files in `<out>/tensorboard/`. A resumed run continues the same run: its first event
  purges what the earlier attempt logged after the checkpoint it resumes from, so no step shows twice; a run
  from the start purges everything before it.
- W&B runs offline (files in `<out>/wandb/`, `wandb sync` uploads them) unless the machine is logged in and
  reaches the W&B server, or WANDB_MODE says otherwise: it never blocks a run. A resumed run continues the same
  W&B run (its id is kept in `<out>/wandb/mmctl-run-id`).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from mmctl.errors import UsageError

NAMES = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install 'mmctl[tensorboard]'", "wandb": "pip install 'mmctl[wandb]'"}


def flatten(tree, prefix: str = "") -> dict:
    """{"train.steps": 200, …}: a nested recipe as flat names with plain values (lists as their JSON)."""
    if isinstance(tree, dict):
        flat = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    value = tree if isinstance(tree, bool | int | float | str) else json.dumps(tree)
    return {prefix.removesuffix("."): value}


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class TensorBoard:
    def __init__(self, out: Path, hparams: dict, recipe_text: str, resume: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams as hparams_summary
        except ImportError:
            raise UsageError(f"train.loggers: tensorboard is not installed ({INSTALL['tensorboard']})") from None
        # the purge: a reader drops the events an earlier attempt logged at or after this step
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume + 1 if resume else 0)
        if not resume:
            for summary in hparams_summary(hparams, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("recipe", "```yaml\n" + recipe_text + "\n```", 0)
        self.writer.flush()

    def log(self, record: dict, to: str) -> None:
        step = record.get("step", 0)
        if to != "metrics.jsonl":
            self.writer.add_text(to.removesuffix(".jsonl"), "```json\n" + json.dumps(record, indent=1) + "\n```",
                                 step)
            return
        for name, value in record.items():
            if name == "step" or value is None:
                continue
            if _number(value):
                self.writer.add_scalar(name, value, step)
            elif isinstance(value, str | list | dict):
                self.writer.add_text(name, value if isinstance(value, str) else json.dumps(value), step)
        self.writer.flush()  # a run watched live: each record visible as it is logged

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, hparams: dict, stage: str):
        try:
            import wandb
        except ImportError:
            raise UsageError(f"train.loggers: wandb is not installed ({INSTALL['wandb']})") from None
        root = out / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "mmctl-run-id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mmctl"), name=f"{stage}:{out.name}",
                              id=run_id, resume="allow", dir=str(out), config=hparams, mode=_wandb_mode(),
                              settings=wandb.Settings(init_timeout=60, console="off", silent=True))

    def log(self, record: dict, to: str) -> None:
        step = record.get("step", 0)
        if to != "metrics.jsonl":
            self.run.log({to.removesuffix(".jsonl"): json.dumps(record)}, step=step)
            return
        values = {k: v for k, v in record.items() if k != "step" and (_number(v) or isinstance(v, str))}
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_mode() -> str:
    """online only where it can work without waiting: logged in and the server answers; WANDB_MODE decides first."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()
    return "online" if logged_in and _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")) else \
        "offline"


def _netrc() -> str:
    try:
        return (Path.home() / ".netrc").read_text(errors="replace")
    except OSError:
        return ""


def _reachable(url: str) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


class Loggers:
    """The loggers a recipe names, fed every record the run logs (rank 0 only)."""

    def __init__(self, names: list[str], out: Path, stage: str, recipe: dict, recipe_text: str,
                 resume: int | None):
        hparams = flatten(recipe)
        self.loggers = []
        try:
            for name in dict.fromkeys(names):
                self.loggers.append(TensorBoard(out, hparams, recipe_text, resume) if name == "tensorboard" else
                                    WandB(out, hparams, stage))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict, to: str) -> None:
        for logger in self.loggers:
            logger.log(record, to)

    def close(self) -> None:
        while self.loggers:
            self.loggers.pop().close()
