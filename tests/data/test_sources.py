"""Sources and mixtures: every kind reads, the split is by content and seeded, weights repeat documents, and
bad inputs are clear errors."""

import json

import pytest

from mmctl.data.sources import TextSource, mixture
from mmctl.errors import DataError


def documents(source, seed=0):
    """A source's documents as a mixture reads them: capped at `documents`, and an empty source an error."""
    return [d for _, _, d in mixture([source], seed, 0)]


def test_text_files_globs_and_separators(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.txt").write_text("three")
    assert documents(TextSource(kind="text", path=str(tmp_path / "*.txt")), 0) == ["one\n\ntwo", "three"]
    split = TextSource(kind="text", path=str(tmp_path / "a.txt"), separator="\n\n")
    assert documents(split, 0) == ["one", "two"]
    assert documents(TextSource(kind="text", path=str(tmp_path)), 0) == ["one\n\ntwo", "three"]


def test_jsonl_field_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b", "x": 1}\n')
    assert documents(TextSource(kind="jsonl", path=str(path)), 0) == ["a", "b"]
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'text' \(has: body\)"):
        documents(TextSource(kind="jsonl", path=str(path)), 0)
    path.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not a JSON object"):
        documents(TextSource(kind="jsonl", path=str(path)), 0)
    path.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="field 'text' is int, expected str"):
        documents(TextSource(kind="jsonl", path=str(path)), 0)


def test_parquet_and_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x", "y", None]}), tmp_path / "d.parquet")
    got = documents(TextSource(kind="parquet", path=str(tmp_path / "d.parquet"), field="content"), 0)
    assert got == ["x", "y"]
    with pytest.raises(DataError, match="no column 'text'"):
        documents(TextSource(kind="parquet", path=str(tmp_path / "d.parquet")), 0)
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["p", "q"]})}).save_to_disk(tmp_path / "ds")
    assert documents(TextSource(kind="datasets", path=str(tmp_path / "ds")), 0) == ["p", "q"]
    with pytest.raises(DataError, match="no split 'test'"):
        documents(TextSource(kind="datasets", path=str(tmp_path / "ds"), split="test"), 0)


def test_builtin_sources_are_deterministic():
    pydoc = documents(TextSource(kind="pydoc"), 0)
    assert len(pydoc) > 50 and sum(map(len, pydoc)) > 300_000
    a = documents(TextSource(kind="stories", documents=5), 3)
    assert a == documents(TextSource(kind="stories", documents=5), 3)
    assert a != documents(TextSource(kind="stories", documents=5), 4)
    assert len(documents(TextSource(kind="pydoc", documents=3), 0)) == 3


def test_story_questions_are_a_story_then_its_questions_and_answers_read_off_it():
    """In eval's plain story-questions format, the answers after each question (TinyStories-Instruct's idea:
    questions inside the pretraining text); all four questions per story, fresh stories in every seed."""
    docs = documents(TextSource(kind="story-questions", documents=40), 0)
    assert len(docs) == 40 and docs != documents(TextSource(kind="story-questions", documents=40), 1)
    for doc in docs:
        story, *lines = doc.split("\n")
        questions, answers = lines[0::2], lines[1::2]
        assert len(questions) == len(answers) == 4 and len({q.split()[2] for q in questions}) == 4
        assert all(q.startswith("Question: ") and q.endswith("?") for q in questions)
        assert all(a.startswith("Answer: ") and a.removeprefix("Answer: ") in story for a in answers)


@pytest.mark.parametrize("make, fragment", [
    (lambda p: TextSource(kind="text", path=str(p / "missing.txt")), "missing.txt: no such file"),
    (lambda p: TextSource(kind="text", path=str(p / "*.md")), "the glob matched nothing"),
    (lambda p: (p / "empty.txt").write_text("") and None or TextSource(kind="text", path=str(p / "empty.txt")),
     "the source has no documents"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe") and None or TextSource(kind="text", path=str(p / "bin.txt")),
     "not UTF-8 text"),
])
def test_bad_inputs_are_data_errors(tmp_path, make, fragment):
    with pytest.raises(DataError, match=fragment):
        documents(make(tmp_path), 0)


def test_split_is_by_content_and_weights_repeat():
    docs = TextSource(kind="stories", documents=2000)
    out = list(mixture([docs], seed=0, val_fraction=0.1))
    val = [d for s, _, d in out if s == "val"]
    train = [d for s, _, d in out if s == "train"]
    assert 150 < len(val) < 250 and not set(val) & set(train)
    twice = list(mixture([TextSource(kind="stories", documents=2000, weight=2.0)], 0, 0.1))
    assert len([1 for s, _, _ in twice if s == "train"]) == 2 * len(train)
    assert [d for s, _, d in twice if s == "val"] == val  # validation documents are never repeated
    halved = TextSource(kind="stories", documents=2000, weight=0.5)
    half = [d for s, _, d in mixture([halved], 0, 0.1) if s == "train"]
    assert 0.4 * len(train) < len(half) < 0.6 * len(train)


def test_source_rules():
    assert TextSource(kind="text").check() == [("path", "missing required value: a text source needs a path")]
    assert TextSource(kind="stories").check()[0][0] == "documents"
    assert TextSource(kind="pydoc", path="x").check()[0][0] == "path"
    assert TextSource(kind="jsonl", path="x", separator="\n").check()[0][0] == "separator"
    json.dumps(TextSource(kind="pydoc").__dict__)  # plain data: goes into manifests as is


def test_text_streams_in_reads_that_cut_characters_and_separators(tmp_path, monkeypatch):
    """Split as the file streams, in reads as small as one byte, a file gives what splitting it whole gives —
    separators and multi-byte characters cut by a read included — and a bad byte is named by its offset."""
    import random

    from mmctl.data import sources

    rng, path = random.Random(0), tmp_path / "t.txt"
    for _ in range(200):
        text = "".join(rng.choice("ab\n\né€😀 x") for _ in range(rng.randint(0, 120)))
        separator = rng.choice(["\n\n", "\n", "é€", "😀", "x"])
        path.write_text(text, encoding="utf-8")
        monkeypatch.setattr(sources, "CHUNK", rng.randint(1, 9))
        assert list(sources._text(path, separator)) == text.split(separator)
        assert list(sources._text(path, None)) == [text]
    path.write_bytes("héllo".encode() + b"\xff")
    with pytest.raises(DataError, match="not UTF-8 text \\(byte 6\\)"):
        list(sources._text(path, "\n"))


def test_text_memory_is_bounded_by_a_read_not_the_file(tmp_path, monkeypatch):
    """Peak memory while streaming a 40 MB file's documents is that of a 4 MB file's: a read and a document."""
    import tracemalloc

    from mmctl.data import sources

    monkeypatch.setattr(sources, "CHUNK", 1 << 18)
    peaks = []
    for megabytes in (4, 40):
        path = tmp_path / f"{megabytes}.txt"
        document = ("Once upon a time there was a little fox. " * 40 + "\n\n").encode()
        with open(path, "wb") as f:
            for _ in range(megabytes * (1 << 20) // len(document)):
                f.write(document)
        tracemalloc.start()
        count = sum(1 for _ in sources._text(path, "\n\n"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert count > 1000
    assert peaks[1] < 1.5 * peaks[0] + (1 << 20) and peaks[1] < 8 << 20, peaks
