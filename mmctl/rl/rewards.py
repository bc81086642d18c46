"""Verifiable rewards for GRPO: each scores one completion against its problem's known answer, and never fails
on what a model writes (garbage in, a low reward out).

Built in (`rewards: [{name, weight}]` in a recipe; the reward of a completion is the weighted sum):
- `numeric`: 1 if the answer's last number equals the reference as a number ("1,000" = "1000.0" = "1000"), else 0.
- `exact`: 1 if the answer, stripped (and normalised as eval's exact match does), equals the reference, else 0.
- `think_format`: 1 if the completion is DeepSeek-R1's `<think>…</think> <answer>…</answer>` and nothing else.
- `hashes_format`: 1 if the completion ends with GSM8K's `#### <number>`.
- `length`: −(completion tokens / max_completion_tokens), in [−1, 0]: a nudge towards shorter answers.
- `module:function`: your own Python function `f(completion: str, answer: str) -> float`, imported from the
  working directory or the Python path. It runs your code, so it must be allowed in the recipe
  (`grpo.allow_python_rewards: true`); a recipe from someone else cannot run code you did not agree to.

"The answer" of a completion is what sits inside `<answer>…</answer>` if it has one, else the line after `####`,
else the whole completion, so `numeric` and `exact` work with and without a format.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from mmctl.errors import DataError, UsageError
from mmctl.evals.extract import exact_match, extract, normalize
from mmctl.recipe import option
from mmctl.runtime import time_limit


@dataclass
class Sample:
    """One completion as a reward function sees it."""

    completion: str  # its text, special tokens removed
    answer: str  # the problem's reference answer
    tokens: int  # completion tokens, the end-of-turn token included
    max_tokens: int  # the most a completion may have (grpo.max_completion_tokens)


@dataclass
class RewardSpec:
    name: str = option(None, "numeric | exact | think_format | hashes_format | length | module:function (your "
                             "Python function f(completion, answer) -> float; needs grpo.allow_python_rewards)",
                       required=True)
    weight: float = option(1.0, "its weight in the summed reward")

    def check(self) -> list[tuple[str, str]]:
        if self.name in BUILTIN:
            return []
        if ":" not in self.name:
            return [("name", f"unknown reward {self.name!r}: one of {', '.join(BUILTIN)}, or module:function")]
        module, _, function = self.name.partition(":")
        if not all(part.isidentifier() for part in module.split(".")) or not function.isidentifier():
            return [("name", f"{self.name!r} is not module:function (an absolute module path of Python names, a "
                             "function name: no relative or file paths)")]
        return []


ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
THINK_ANSWER = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)
HASHES_END = re.compile(r"####\s*-?\$?\d[\d,]*(?:\.\d+)?\s*$")


def answer_part(completion: str) -> str:
    """The part of a completion that states its answer (see the module docstring)."""
    tagged = ANSWER.search(completion)
    if tagged:
        return tagged.group(1)
    _, hashes, rest = completion.partition("####")
    return rest.strip().split("\n", 1)[0] if hashes else completion


def numeric(s: Sample) -> float:
    return float(exact_match(extract(answer_part(s.completion), "last_number"), s.answer))


def exact(s: Sample) -> float:
    return float(normalize(answer_part(s.completion)) == normalize(s.answer))


def think_format(s: Sample) -> float:
    return float(THINK_ANSWER.fullmatch(s.completion) is not None)


def hashes_format(s: Sample) -> float:
    return float(HASHES_END.search(s.completion) is not None)


def length(s: Sample) -> float:
    return -s.tokens / s.max_tokens


BUILTIN: dict[str, Callable[[Sample], float]] = {
    "numeric": numeric, "exact": exact, "think_format": think_format, "hashes_format": hashes_format,
    "length": length}


def resolve(specs: list[RewardSpec], allow_python: bool, seconds: float = 10.0
            ) -> list[tuple[str, float, Callable[[Sample], float]]]:
    """(name, weight, function) for each reward of a recipe; a user's function is imported here, once, and each
    call of it may take at most `seconds`."""
    out = []
    for spec in specs:
        if spec.name in BUILTIN:
            out.append((spec.name, spec.weight, BUILTIN[spec.name]))
            continue
        if not allow_python:
            raise UsageError(f"grpo.rewards: {spec.name} runs Python code from your environment; set "
                             "grpo.allow_python_rewards: true to allow it")
        out.append((spec.name, spec.weight, _user_function(spec.name, seconds)))
    return out


def _user_function(path: str, seconds: float) -> Callable[[Sample], float]:
    module_name, _, name = path.partition(":")
    if "" not in sys.path:  # a reward file beside the recipe, as `python -m` would find it
        sys.path.insert(0, "")
    try:
        with time_limit(seconds, f"importing {module_name} (grpo.reward_seconds)"):
            fn = getattr(importlib.import_module(module_name), name)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module: whatever importing it raises
        raise UsageError(f"grpo.rewards: cannot import {path} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UsageError(f"grpo.rewards: {path} is not a function")

    def call(s: Sample) -> float:
        try:
            with time_limit(seconds, "one call (grpo.reward_seconds)"):
                value = fn(s.completion, s.answer)
            number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: any failure is one line naming it
            raise DataError(f"reward {path} failed on the completion {s.completion[:60]!r}: "
                            f"{type(e).__name__}: {e}") from None
        if number is None or not math.isfinite(number):
            raise DataError(f"reward {path} returned {_short(value)} for {s.completion[:60]!r}; expected a finite "
                            "number")
        return number

    return call


def _short(value) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails (or an int too long to print)
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "…"


def correct(specs: list[RewardSpec]) -> Callable[[Sample], float]:
    """What `accuracy` counts: the recipe's `exact` reward if it has one, else `numeric`."""
    return exact if any(s.name == "exact" for s in specs) else numeric
