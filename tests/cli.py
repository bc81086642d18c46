"""The two ways tests run the `mmctl` command: `mmctl(...)` in a real process (what a user's shell does: exit
codes, stdout apart from stderr, signals, imports), and `invoke(...)` in this process (the same app and
arguments, without a new interpreter: the quick way, where the process itself is not what is tested)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def mmctl(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m mmctl ARGS…` in a new process (text output, offline, one thread)."""
    return subprocess.run([sys.executable, "-m", "mmctl", *args], capture_output=True, text=True, cwd=cwd, env=ENV,
                          timeout=timeout)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def invoke(*args: str, cwd=None) -> Result:
    """`mmctl ARGS…` run in this process through typer's test runner (stdout and stderr apart, as in a shell)."""
    from typer.testing import CliRunner

    from mmctl.cli import app

    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        done = CliRunner().invoke(app, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)
    return Result(done.exit_code, done.stdout, done.stderr)
