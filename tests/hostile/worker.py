"""Runs hostile cases in one process under resource limits: `python -m tests.hostile.worker CASES.json OUT.json`.

Each case is `{"name", "argv", "cwd"}`; it runs `mmctl ARGV` in-process (the same code path as the command line)
with stderr captured, a time limit, and the address space capped for the whole worker, and records the exit code,
the stderr lines, whether a traceback escaped, and the seconds taken. One process for many cases: importing torch
once instead of once per case keeps the suite quick.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import sys
import time
import traceback

MEMORY = 8 * 2**30  # bytes of address space for the whole worker: a runaway allocation fails, never swaps
SECONDS = 60  # per case: a hang fails the case instead of the suite


class TimedOut(BaseException):
    pass


def _alarm(signum, frame):
    raise TimedOut


def run_case(case: dict) -> dict:
    from mmctl.cli import app

    err, out = io.StringIO(), io.StringIO()
    code, escaped = None, None
    start = time.perf_counter()
    here = os.getcwd()
    os.chdir(case.get("cwd") or here)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            app(case["argv"], prog_name="mmctl")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except TimedOut:
        code, escaped = "timeout", f"no result after {SECONDS} s"
    except MemoryError:
        code, escaped = "memory", "MemoryError: the case tried to allocate beyond the worker's limit"
    except BaseException:  # a traceback the user would have seen
        code, escaped = 1, traceback.format_exc()
    finally:
        signal.alarm(0)
        os.chdir(here)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return {"name": case["name"], "code": code, "stderr": lines, "traceback": escaped,
            "seconds": time.perf_counter() - start}


def main() -> None:
    cases_path, out_path = sys.argv[1], sys.argv[2]
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # noqa: F401 - imported before the limit matters case by case

    torch.set_num_threads(1)
    cases = json.loads(open(cases_path, encoding="utf-8").read())
    results = [run_case(case) for case in cases]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
