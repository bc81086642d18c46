"""Sources and mixtures: every kind reads, the split is by content and seeded, weights repeat documents, and
bad inputs are clear errors."""

import json

import pytest

from mmctl.data import sources
from mmctl.data.sources import SourceConfig, mixture
from mmctl.errors import DataError


def test_text_files_globs_and_separators(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    (tmp_path / "b.txt").write_text("three")
    assert list(sources.read(SourceConfig(kind="text", path=str(tmp_path / "*.txt")), 0)) == ["one\n\ntwo", "three"]
    split = SourceConfig(kind="text", path=str(tmp_path / "a.txt"), separator="\n\n")
    assert list(sources.read(split, 0)) == ["one", "two"]
    assert list(sources.read(SourceConfig(kind="text", path=str(tmp_path)), 0)) == ["one\n\ntwo", "three"]


def test_jsonl_field_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b", "x": 1}\n')
    assert list(sources.read(SourceConfig(kind="jsonl", path=str(path)), 0)) == ["a", "b"]
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'text' \(has: body\)"):
        list(sources.read(SourceConfig(kind="jsonl", path=str(path)), 0))
    path.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not a JSON object"):
        list(sources.read(SourceConfig(kind="jsonl", path=str(path)), 0))
    path.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="field 'text' is int, expected str"):
        list(sources.read(SourceConfig(kind="jsonl", path=str(path)), 0))


def test_parquet_and_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x", "y", None]}), tmp_path / "d.parquet")
    got = list(sources.read(SourceConfig(kind="parquet", path=str(tmp_path / "d.parquet"), field="content"), 0))
    assert got == ["x", "y"]
    with pytest.raises(DataError, match="no column 'text'"):
        list(sources.read(SourceConfig(kind="parquet", path=str(tmp_path / "d.parquet")), 0))
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["p", "q"]})}).save_to_disk(tmp_path / "ds")
    assert list(sources.read(SourceConfig(kind="datasets", path=str(tmp_path / "ds")), 0)) == ["p", "q"]
    with pytest.raises(DataError, match="no split 'test'"):
        list(sources.read(SourceConfig(kind="datasets", path=str(tmp_path / "ds"), split="test"), 0))


def test_builtin_sources_are_deterministic():
    pydoc = list(sources.read(SourceConfig(kind="pydoc"), 0))
    assert len(pydoc) > 50 and sum(map(len, pydoc)) > 300_000
    a = list(sources.read(SourceConfig(kind="stories", documents=5), 3))
    assert a == list(sources.read(SourceConfig(kind="stories", documents=5), 3))
    assert a != list(sources.read(SourceConfig(kind="stories", documents=5), 4))
    assert len(list(sources.read(SourceConfig(kind="pydoc", documents=3), 0))) == 3


@pytest.mark.parametrize("make, fragment", [
    (lambda p: SourceConfig(kind="text", path=str(p / "missing.txt")), "missing.txt: no such file"),
    (lambda p: SourceConfig(kind="text", path=str(p / "*.md")), "the glob matched nothing"),
    (lambda p: (p / "empty.txt").write_text("") and None or SourceConfig(kind="text", path=str(p / "empty.txt")),
     "the source has no documents"),
    (lambda p: (p / "bin.txt").write_bytes(b"\xff\xfe") and None or SourceConfig(kind="text", path=str(p / "bin.txt")),
     "not UTF-8 text"),
])
def test_bad_inputs_are_data_errors(tmp_path, make, fragment):
    with pytest.raises(DataError, match=fragment):
        list(sources.read(make(tmp_path), 0))


def test_split_is_by_content_and_weights_repeat():
    docs = SourceConfig(kind="stories", documents=2000)
    out = list(mixture([docs], seed=0, val_fraction=0.1))
    val = [d for s, _, d in out if s == "val"]
    train = [d for s, _, d in out if s == "train"]
    assert 150 < len(val) < 250 and not set(val) & set(train)
    twice = list(mixture([SourceConfig(kind="stories", documents=2000, weight=2.0)], 0, 0.1))
    assert len([1 for s, _, _ in twice if s == "train"]) == 2 * len(train)
    assert [d for s, _, d in twice if s == "val"] == val  # validation documents are never repeated
    halved = SourceConfig(kind="stories", documents=2000, weight=0.5)
    half = [d for s, _, d in mixture([halved], 0, 0.1) if s == "train"]
    assert 0.4 * len(train) < len(half) < 0.6 * len(train)


def test_source_rules():
    assert SourceConfig(kind="text").check() == [("path", "missing required value: a text source needs a path")]
    assert SourceConfig(kind="stories").check()[0][0] == "documents"
    assert SourceConfig(kind="pydoc", path="x").check()[0][0] == "path"
    assert SourceConfig(kind="jsonl", path="x", separator="\n").check()[0][0] == "separator"
    json.dumps(SourceConfig(kind="pydoc").__dict__)  # plain data: goes into manifests as is
