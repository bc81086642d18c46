"""The one rich Console of the program, machine-readable output, and progress that works off a TTY.

Human text goes to stderr so that `--json` output on stdout can be piped (DESIGN §7). Off a terminal (make,
CI, a log file) rich's live bar would print nothing useful, so progress falls back to one plain line every few
seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

# Off a terminal rich assumes 80 columns, which folds wide tables into unreadable cells; logs can be wider.
console = Console(stderr=True, highlight=False,
                  width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 120)


def emit_json(obj: Any) -> None:
    """Print one machine-readable JSON object on stdout (strict JSON: a NaN or infinity is null, as jq expects)."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Progress of `total` units of work: a rich bar on a TTY, a plain line every `every` seconds off one.

    Use as a context manager and call `update(done, loss=..., ...)`; the extra fields are shown after the count.
    """

    def __init__(self, total: int | None, description: str, *, every: float = 5.0, out: Console | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.description, self.every = total, description, every
        self.out = out or console
        self.clock = clock
        self._bar = None
        self._task = None

    def __enter__(self) -> Progress:
        self._start = self._last = self.clock()
        if self.out.is_terminal:
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TextColumn("{task.fields[info]}"),
                                     TimeRemainingColumn(), console=self.out, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def update(self, done: int, **fields: Any) -> None:
        info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=done, info=info)
            return
        now = self.clock()
        if now - self._last >= self.every or (self.total is not None and done >= self.total):
            self._last = now
            if self.total is None:  # open-ended work (a stream of documents): count and fields only
                self.out.print(f"{self.description}: {done}  {info}".rstrip(), soft_wrap=True)
                return
            elapsed = now - self._start
            eta = elapsed / done * (self.total - done) if done else float("nan")
            pct = 100.0 * done / self.total if self.total else 100.0
            eta_text = format_duration(eta) if eta == eta else "?"
            self.out.print(f"{self.description}: {done}/{self.total} ({pct:.0f}%)  {info}  eta {eta_text}".rstrip(),
                           soft_wrap=True)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
