"""Answer extraction and exact match for generation tasks (lm-eval's `filter` + `exact_match`).

Extraction: `last_number` (the last number in the completion, as GSM8K-style graders do), `hashes` (what follows
`####`, GSM8K's answer marker), `exact` (the whole completion, stripped), `regex:PATTERN` (the first group, or
the whole match). Normalization before comparing: surrounding whitespace, a trailing period, thousands
separators and a leading `$` go; numbers compare as numbers, so "1,000", "1000.0" and "1000" are equal.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def extract(text: str, how: str) -> str | None:
    if how == "last_number":
        found = NUMBER.findall(text)
        return found[-1] if found else None
    if how == "hashes":
        _, sep, rest = text.partition("####")
        return rest.strip().splitlines()[0].strip() if sep and rest.strip() else None
    if how == "exact":
        return text.strip()
    if how.startswith("regex:"):
        match = re.search(how[len("regex:"):], text)
        if match is None:
            return None
        return match.group(1) if match.groups() else match.group(0)
    raise ValueError(f"unknown extraction {how!r}")


def normalize(answer: str | int | float) -> str:
    text = str(answer).strip().rstrip(".").replace(",", "").removeprefix("$").strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def exact_match(prediction: str | None, target: str | int | float) -> bool:
    return prediction is not None and normalize(prediction) == normalize(target)
