"""The one JSONL reader: corpora, eval task files, prompt files, chat and preference data all come through here.

A malformed line — not UTF-8, not JSON, not an object, a missing or mistyped field — is one `DataError` naming
`file:line` (exit code 3, as for any corrupt input), never a traceback, wherever the file is read. Blank lines
are skipped. Lines are read one at a time, so a large corpus is never held in memory whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from mmctl.artifacts import regular_file
from mmctl.errors import DataError


def records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for every non-blank line of `path`."""
    path = regular_file(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not a JSON object ({getattr(e, 'msg', e)})") from None
            except RecursionError:
                raise DataError(f"{where}: nested too deeply") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if "\\u" in line and not _is_text(record):  # (only an escape can make a lone surrogate)
                raise DataError(f"{where}: holds a lone UTF-16 surrogate (\\ud800–\\udfff), which is not text")
            yield where, record


def field(record: dict, name: str, kind: type | tuple[type, ...], where: str):
    """record[name], which must exist and be of `kind` (a bool is not a number here)."""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (has: {', '.join(sorted(record)) or 'nothing'})")
    value = record[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise DataError(f"{where}: field {name!r} is {type(value).__name__}, expected "
                        f"{' or '.join(t.__name__ for t in _types(kind))}")
    return value


def _is_text(record) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
