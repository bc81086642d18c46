"""Floors: the numbers a pipeline's runs must clear, so CI catches a change that quietly stops a model learning.

A floors file is YAML — a list of checks, each naming a run dir (by name), a value in its manifest's `results`
(a dotted path; a key holding dots or slashes goes in brackets) and a bound:

    - run: pretrain
      value: final.val_loss
      max: 2.0
      why: far under the unigram entropy (~6 nats): the model learned more than token frequencies
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from mmctl.errors import UsageError
from mmctl.report.runs import StageRun, lookup


def read(path: str | Path) -> list[dict]:
    """The checks of a floors file, read as strictly as a recipe (a regular UTF-8 file, plain YAML, no alias
    bombs): any problem is one UsageError naming the file."""
    from mmctl import recipe

    text = recipe.read(path)
    try:
        checks = recipe.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply") from None
    except UsageError as e:
        raise UsageError(f"{path}: {e.problems[0].split(': ', 1)[-1]}") from None
    if not isinstance(checks, list):
        raise UsageError(f"{path}: expected a list of checks (run, value, min or max, why)")
    for i, c in enumerate(checks):
        if not (isinstance(c, dict) and isinstance(c.get("run"), str) and isinstance(c.get("value"), str)
                and ("min" in c or "max" in c) and set(c) <= {"run", "value", "min", "max", "why"}
                and all(isinstance(c.get(k, 0), int | float) and not isinstance(c.get(k, 0), bool)
                        for k in ("min", "max"))):
            raise UsageError(f"{path}: check {i + 1}: expected run (a run dir's name), value (a path into its "
                             "results), min and/or max (numbers), and optionally why")
    return checks


def check(checks: list[dict], found: list[StageRun]) -> list[dict]:
    """Each check with the value found and whether it passed (a run missing or unfinished fails its checks)."""
    by_name = {r.name: r for r in found}
    out = []
    for c in checks:
        run = by_name.get(c["run"])
        value = lookup(run.results, c["value"]) if run is not None and run.status == "finished" else None
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = number and math.isfinite(value) and c.get("min", -math.inf) <= value <= c.get("max", math.inf)
        why = ("no run dir of that name" if run is None else f"the run is {run.status}" if run.status != "finished"
               else "no such value in its results" if value is None
               else f"not a number ({type(value).__name__})" if not number else "")
        out.append({**c, "found": value, "ok": bool(ok), "problem": why})
    return out


def describe(result: dict) -> str:
    bound = " and ".join(f"{'≥' if k == 'min' else '≤'} {result[k]}" for k in ("min", "max") if k in result)
    found = result["problem"] or f"{result['found']:.4g}"
    return f"{result['run']} {result['value']} = {found}, floor {bound}" + (f" ({result['why']})" if result.get("why")
                                                                             else "")
