"""One JSONL reader: the same malformed line gives the same one-line error and exit code wherever it is read —
a corpus, an eval task file, a prompts file."""

import pytest

from mmctl.data import jsonl
from mmctl.data.sources import TextSource, read
from mmctl.errors import DataError
from mmctl.evals.tasks import GEN_FIELDS, read_jsonl
from mmctl.stages.generate import read_prompts

READERS = {
    "corpus": lambda path: list(read(TextSource(kind="jsonl", path=str(path), field="prompt"), 0)),
    "task file": lambda path: read_jsonl(path, GEN_FIELDS),
    "prompts file": read_prompts,
}
GOOD = '{"prompt": "2 + 2 =", "answer": 4}'
BAD = {
    "not JSON": ("{oops", "f.jsonl:2: not a JSON object"),
    "not an object": ("[1, 2]", "f.jsonl:2: expected a JSON object, got list"),
    "missing field": ('{"answer": 4}', "f.jsonl:2: missing field 'prompt' (has: answer)"),
    "wrong type": ('{"prompt": 7, "answer": 4}', "f.jsonl:2: field 'prompt' is int, expected str"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", BAD)
def test_the_same_error_everywhere(tmp_path, reader, case):
    line, message = BAD[case]
    path = tmp_path / "f.jsonl"
    path.write_text(GOOD + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        READERS[reader](path)
    assert message in str(e.value) and e.value.exit_code == 3 and "\n" not in str(e.value)


@pytest.mark.parametrize("reader", READERS)
def test_binary_garbage_names_the_line(tmp_path, reader):
    path = tmp_path / "f.jsonl"
    path.write_bytes(GOOD.encode() + b"\n\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match=r"f.jsonl:2: not UTF-8 text"):
        READERS[reader](path)


def test_blank_lines_are_skipped_and_lines_numbered(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text("\n" + GOOD + "\n\n" + GOOD + "\n")
    assert [where for where, _ in jsonl.records(path)] == [f"{path}:2", f"{path}:4"]
