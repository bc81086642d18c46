"""Corpus sources: where documents come from, how mixtures weight them, and the train/val split.

A source is one entry of a recipe's `data.sources` list: local text files (globs allowed), a jsonl field, a
parquet column, a `datasets` dataset (a local `save_to_disk` directory, or `hf:org/name` for users with network),
or one of the built-in offline corpora — Python's bundled `pydoc_data.topics` reference text and the procedural
generators of `mmctl.data.synthetic`.

The split and the weights are every mixture's (mmctl/data/mixture.py): by content, so a repeated document lands
on one side, and weights as repetition counts of the training documents.
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from mmctl.data.mixture import Source, stream
from mmctl.errors import DataError, UsageError
from mmctl.recipe import option

FILE_KINDS = ("text", "jsonl", "parquet", "datasets")


@dataclass
class TextSource(Source):
    kind: Literal["text", "jsonl", "parquet", "datasets", "pydoc", "stories", "story-questions", "arithmetic"] = option(
        None, "text | jsonl | parquet | datasets | pydoc (Python's reference text) | stories | story-questions (a "
              "story, then each question about it and its answer) | arithmetic", required=True)
    path: str | None = option(None, "file, glob or directory (text, jsonl, parquet); a save_to_disk directory or "
                                    "hf:org/name (datasets)")
    field: str = option("text", "the jsonl field, parquet column or datasets column that holds the text")
    separator: str | None = option(None, "text files: split each file into documents at this string (e.g. a "
                                         "blank line); unset: one document per file")
    documents: int | None = option(None, "documents to generate (stories, arithmetic), or at most to read (at most "
                                                "10^9)", ge=1, le=10**9)

    FILES: ClassVar[tuple[str, ...]] = FILE_KINDS
    COUNT: ClassVar[str] = "documents"

    def check(self) -> list[tuple[str, str]]:
        if self.kind == "pydoc" and not self.path:  # built in, and read whole unless capped
            return []
        if problems := super().check():
            return problems
        if self.separator is not None and self.kind != "text":
            return [("separator", "only text sources are split at a separator")]
        if self.separator == "":
            return [("separator", "must not be empty")]
        return []


def read(source: TextSource, seed: int) -> Iterator[str]:
    """The documents of one source, in a deterministic order (empty documents are skipped)."""
    return (doc for doc in _read(source, seed) if doc)


def _read(source: TextSource, seed: int) -> Iterator[str]:
    if source.kind == "stories":
        from mmctl.data.synthetic import stories

        yield from stories(source.documents, seed)
    elif source.kind == "story-questions":
        from mmctl.data.synthetic import story_quiz

        for story, quiz in story_quiz(source.documents, seed):
            yield story + "".join(f"\nQuestion: {question}\nAnswer: {answer}" for question, answer in quiz)
    elif source.kind == "arithmetic":
        from mmctl.data.synthetic import arithmetic

        yield from arithmetic(source.documents, seed)
    elif source.kind == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
    elif source.kind == "datasets":
        yield from _datasets(source)
    else:
        for path in files(source.path):
            if source.kind == "text":
                yield from _text(path, source.separator)
            elif source.kind == "jsonl":
                yield from _jsonl(path, source.field)
            else:
                yield from _parquet(path, source.field)


def files(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"{pattern}: no such file" + (" (the glob matched nothing)" if any(c in pattern for c in "*?[")
                                                      else ""))
    return files


CHUNK = 1 << 20  # bytes a text file is read at a time


def _text(path: Path, separator: str | None) -> Iterator[str]:
    """A text file's documents: split at `separator` as the file streams in CHUNK-sized reads (memory holds one
    read and the document it ends in, whatever the file's size), or the whole file as one document."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, done = "", 0  # text not yet split; bytes decoded so far
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                held = len(decoder.getstate()[0])  # bytes of a character cut by the previous read
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: not UTF-8 text (byte {done - held + e.start})") from None
                done += len(chunk)
                if separator:
                    scan = max(0, len(pending) - len(separator) + 1)  # a separator may straddle two reads
                    pending += text
                    start = 0
                    while (at := pending.find(separator, scan)) >= 0:
                        yield pending[start:at]
                        start = scan = at + len(separator)
                    pending = pending[start:]
                else:
                    pending += text
                if not chunk:
                    break
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    yield pending


def _jsonl(path: Path, name: str) -> Iterator[str]:
    from mmctl.data import jsonl

    for where, record in jsonl.records(path):
        yield jsonl.field(record, name, str, where)


def _parquet(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("parquet sources need pyarrow: pip install 'mmctl[data]'") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if column not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {column!r} (has: {', '.join(table.schema_arrow.names)})")
    for batch in table.iter_batches(columns=[column]):
        yield from (x for x in batch.column(0).to_pylist() if x)


def _datasets(source: TextSource) -> Iterator[str]:
    data = open_dataset(source.path, source.split)
    if source.field not in data.column_names:
        raise DataError(f"{source.path}: no column {source.field!r} (has: {', '.join(data.column_names)})")
    for where, row in _rows(data.select_columns([source.field]), f"{source.path}[{source.split}]"):
        text = row[source.field]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{where}: column {source.field!r} is {type(text).__name__}, expected text")
        yield text


def open_dataset(path: str, split: str):
    """The `split` of a datasets `save_to_disk` directory (or of `hf:org/name`, with network)."""
    try:
        import datasets
    except ImportError:
        raise UsageError("datasets sources need the datasets package: pip install 'mmctl[data]'") from None
    if path.startswith("hf:"):  # needs network; nothing in mmctl's default recipes uses it
        import os

        if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE",
                                                                               "HF_DATASETS_OFFLINE")):
            raise DataError(f"{path}: a Hugging Face hub dataset, and offline mode is set (HF_HUB_OFFLINE / "
                            "HF_DATASETS_OFFLINE); save it with `datasets` where there is network and give the "
                            "directory")
        try:
            return datasets.load_dataset(path[3:], split=split)
        except Exception as e:  # noqa: BLE001 - the hub, the network or the dataset: one line, whichever
            raise DataError(f"{path}: cannot be loaded ({_error(e)})") from None
    if not Path(path).is_dir():
        raise DataError(f"{path}: not a datasets save_to_disk directory")
    try:
        data = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise a dozen types for a damaged directory
        raise DataError(f"{path}: not a readable datasets save_to_disk directory ({_error(e)})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(f"{path}: no split {split!r} (has: {', '.join(data)})")
        data = data[split]
    return data


def dataset_records(path: str, split: str, undecoded: str | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a datasets split, `where` naming it (`dir[train][12]`) as jsonl.records names
    a line: what sft and rl read conversations and pairs from. `undecoded`: an image column handed over as its
    bytes or path, for mmctl to decode with its own checks (data/images.py), not by `datasets`."""
    import datasets

    data = open_dataset(path, split)
    if undecoded in data.column_names and isinstance(data.features[undecoded], datasets.Image):
        data = data.cast_column(undecoded, datasets.Image(decode=False))
    yield from _rows(data, f"{path}[{split}]")


def _rows(data, name: str) -> Iterator[tuple[str, dict]]:
    """(where, row) of a dataset, a row that cannot be read one error naming it."""
    rows = iter(data)
    for i in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt arrow file fails as it is read
            raise DataError(f"{name}[{i}]: cannot be read ({_error(e)})") from None
        yield f"{name}[{i}]", row


def _error(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" + ("…" if len(text) > 160 else "")


def mixture(sources: list[TextSource], seed: int, val_fraction: float) -> Iterator[tuple[str, int, str]]:
    """(split, source index, document) for every document of every source, weighted and split (data/mixture.py),
    streamed: a corpus is never held in memory."""
    return stream(sources, lambda source, index: read(source, seed), seed, val_fraction)
