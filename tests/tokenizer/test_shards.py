"""Token shards: what is written reads back exactly; anything corrupt, truncated or mismatched is refused."""

import json
import struct

import numpy as np
import pytest

from mmctl.errors import DataError
from mmctl.tokenizer.shards import HEADER, Shards, ShardWriter, dtype_for, write_manifest

DOCS = [np.array([5, 6, 7, 1]), np.array([8, 1]), np.array([9, 9, 9, 9, 9, 1]), np.array([3, 1])]


def make(tmp_path, vocab=100, shard_tokens=7):
    writer = ShardWriter(tmp_path, "train", vocab, shard_tokens)
    for doc in DOCS:
        writer.add(doc)
    write_manifest(tmp_path, "abc", vocab, 1, {"train": writer.close(), "val": []})
    return tmp_path


def test_round_trip_and_document_boundaries(tmp_path):
    shards = Shards(make(tmp_path), "train", tokenizer_sha256="abc", vocab_size=100)
    assert shards.tokens == 14 and shards.documents == 4
    docs = [d.tolist() for i in range(len(shards.arrays)) for d in shards.documents_of(i)]
    assert docs == [d.tolist() for d in DOCS]
    assert len(shards.arrays) == 3  # [4+2], [6], [2]: documents never straddle shards
    assert shards.arrays[0].dtype == np.dtype("<u2")


def test_dtype_choice():
    assert dtype_for(65535) == np.uint16 and dtype_for(65536) == np.uint32 and dtype_for(200_000) == np.uint32


def test_uint32_shards(tmp_path):
    writer = ShardWriter(tmp_path, "train", 100_000, 100)
    writer.add(np.array([99_999, 1]))
    write_manifest(tmp_path, "abc", 100_000, 1, {"train": writer.close()})
    shards = Shards(tmp_path, "train")
    assert shards.arrays[0].tolist() == [99_999, 1] and shards.arrays[0].dtype == np.dtype("<u4")


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[:-2]))
    elif how == "flip":
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif how == "magic":
        data[:8] = b"NOTATOKS"
        path.write_bytes(bytes(data))
    elif how == "version":
        data[8:12] = struct.pack("<I", 9)
        path.write_bytes(bytes(data))
    elif how == "header-count":
        data[16:24] = struct.pack("<Q", 2)
        path.write_bytes(bytes(data[:HEADER.size + 4]))
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("how, fragment", [
    ("truncate", "truncated or padded"),
    ("flip", "sha256"),
    ("magic", "not a token shard"),
    ("version", "shard format version 9, expected 1"),
    ("header-count", "header token count 2, manifest says 6"),
    ("delete", "shard missing"),
])
def test_corrupt_shards_are_refused(tmp_path, how, fragment):
    make(tmp_path)
    corrupt(tmp_path / "train-00000.bin", how)
    with pytest.raises(DataError, match=fragment) as e:
        Shards(tmp_path, "train")
    assert "train-00000.bin" in str(e.value) and e.value.exit_code == 3


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    writer = ShardWriter(tmp_path, "train", 10, 100)
    writer.add(np.array([3, 50, 1]))  # 50 ≥ vocab 10: a shard from a different tokenizer
    write_manifest(tmp_path, "abc", 10, 1, {"train": writer.close()})
    with pytest.raises(DataError, match="token id 50 is outside the vocabulary"):
        Shards(tmp_path, "train")


def test_mismatches_against_the_run_are_refused(tmp_path):
    make(tmp_path)
    with pytest.raises(DataError, match="tokenizer sha256 abc"):
        Shards(tmp_path, "train", tokenizer_sha256="def")
    with pytest.raises(DataError, match="vocab size 100, expected 50"):
        Shards(tmp_path, "train", vocab_size=50)
    with pytest.raises(DataError, match="no 'val' shards"):
        Shards(tmp_path, "val")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format"] = "other/2"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="format 'other/2'"):
        Shards(tmp_path, "train")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="not a finished shard directory"):
        Shards(tmp_path, "train")
