"""Token shards: the binary files between `tokenize` and the training stages, and the checks that guard them.

A shard is a 64-byte header followed by token ids, little-endian:

    offset  size  field
    0       8     magic b"MMCTLTOK"
    8       4     format version (1)
    12      4     bytes per token: 2 (uint16, when every id fits: vocab ≤ 65,535) or 4 (uint32)
    16      8     token count
    24      8     vocabulary size of the tokenizer that wrote it
    32      8     document count (documents end with <|eos|> and never straddle shards)
    40      24    zero padding
    64      …     tokens

A shard directory also holds `manifest.json`: format, the tokenizer's sha256 and vocabulary size, the eos id,
and per split the list of shards with their token and document counts and sha256. `Shards` (the reader) checks
all of it — magic, version, size against the header's count, header against manifest, sha256, every id below
the vocabulary size, and the tokenizer's hash against the one training uses — and refuses any mismatch with a
`DataError` (exit 3) naming the file, the expected and the actual value. Shards are written under temporary
names and the directory is published whole, so a killed encode never leaves a shard set that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from mmctl.errors import DataError, UnsafeInputError

MAGIC = b"MMCTLTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ24x")
FORMAT = "mmctl.shards/1"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class ShardWriter:
    """Collects one split's documents into shards of at most `shard_tokens` tokens (a longer document gets a
    shard of its own). Each document goes to the shard's temporary file as it comes — memory holds one document,
    not a shard — and the header, written last at the file's start, makes it whole.

    `state()` says where the split stands (its bytes synced to disk); a writer made with that `state` continues
    from there, dropping whatever was written after it, so a killed encode resumes into the same files."""

    def __init__(self, directory: Path, split: str, vocab_size: int, shard_tokens: int, state: dict | None = None):
        self.directory, self.split, self.vocab_size = Path(directory), split, vocab_size
        self.shard_tokens = shard_tokens
        self.dtype = dtype_for(vocab_size)
        self.entries: list[dict] = []
        self._file = None
        self._tokens = self._docs = 0
        if state is not None:
            self._restore(state)

    def state(self) -> dict:
        """The finished shards and the open one's counts, its bytes on disk before this returns."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"entries": list(self.entries), "tokens": self._tokens, "documents": self._docs}

    def _restore(self, state: dict) -> None:
        """Continue from `state`: shards finished after it are dropped (or reopened: the one that was open) and
        the open shard is cut back to its length then. DataError if the files no longer hold that state."""
        self.entries, self._tokens, self._docs = list(state["entries"]), state["tokens"], state["documents"]
        for entry in self.entries:
            path = self.directory / entry["file"]
            if not path.is_file() or path.stat().st_size != HEADER.size + entry["tokens"] * self.dtype.itemsize:
                raise DataError(f"{path}: missing or not the size the resume state records")
        tmp, n = self._tmp(), len(self.entries)
        if self._tokens and not tmp.exists() and (self.directory / self._name(n)).exists():
            os.replace(self.directory / self._name(n), tmp)  # it was finished after the state
        for path in self.directory.iterdir():
            later = re.fullmatch(rf"\.?{self.split}-(\d+)\.bin(\.tmp)?", path.name)
            if later and int(later[1]) >= n and path != tmp:
                path.unlink()
        if not self._tokens:
            tmp.unlink(missing_ok=True)
            return
        size = HEADER.size + self._tokens * self.dtype.itemsize
        if not tmp.is_file() or tmp.stat().st_size < size:
            raise DataError(f"{tmp}: shorter than the {size} bytes the resume state records")
        self._file = open(tmp, "r+b")  # noqa: SIM115 - closed by _flush
        self._file.truncate(size)
        self._file.seek(size)

    def add(self, ids: np.ndarray) -> None:
        """One document's ids, already ending with <|eos|>."""
        if self._tokens and self._tokens + len(ids) > self.shard_tokens:
            self._flush()
        if self._file is None:
            self._file = open(self._tmp(), "wb")  # noqa: SIM115 - closed by _flush
            self._file.seek(HEADER.size)
        self._file.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._tokens += len(ids)
        self._docs += 1

    def close(self) -> list[dict]:
        if self._file is not None:
            self._flush()
        return self.entries

    def _name(self, index: int) -> str:
        return f"{self.split}-{index:05d}.bin"

    def _tmp(self) -> Path:
        return self.directory / f".{self._name(len(self.entries))}.tmp"

    def _flush(self) -> None:
        name = self._name(len(self.entries))
        f, tmp = self._file, self._tmp()
        f.seek(0)
        f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._tokens, self.vocab_size, self._docs))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        with open(tmp, "rb") as done:
            digest = hashlib.file_digest(done, "sha256").hexdigest()
        os.replace(tmp, self.directory / name)
        self.entries.append({"file": name, "tokens": self._tokens, "documents": self._docs, "sha256": digest})
        self._file, self._tokens, self._docs = None, 0, 0


def write_manifest(directory: Path, tokenizer_sha256: str, vocab_size: int, eos_id: int,
                   splits: dict[str, list[dict]]) -> None:
    manifest = {"format": FORMAT, "tokenizer_sha256": tokenizer_sha256, "vocab_size": vocab_size, "eos_id": eos_id,
                "dtype": dtype_for(vocab_size).name, "splits": splits}
    (Path(directory) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


class Shards:
    """One split of a verified shard directory — or of a `mmctl tokenize` output, which holds one in `shards/` — as
    read-only memory maps (one per shard)."""

    def __init__(self, directory: str | Path, split: str, tokenizer_sha256: str | None = None,
                 vocab_size: int | None = None):
        self.directory = Path(directory)
        if (self.directory / "shards" / "manifest.json").is_file():  # a tokenize output dir: its shards
            self.directory = self.directory / "shards"
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{manifest_path}: missing (not a finished shard directory)")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise DataError(f"{manifest_path}: not valid JSON ({type(e).__name__})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            manifest = manifest if isinstance(manifest, dict) else {}
            raise DataError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if tokenizer_sha256 is not None and manifest["tokenizer_sha256"] != tokenizer_sha256:
            raise DataError(f"{manifest_path}: written by tokenizer sha256 {manifest['tokenizer_sha256'][:12]}…, "
                            f"but this run's tokenizer is {tokenizer_sha256[:12]}…")
        if vocab_size is not None and manifest["vocab_size"] != vocab_size:
            raise DataError(f"{manifest_path}: vocab size {manifest['vocab_size']}, expected {vocab_size}")
        if split not in manifest["splits"] or not manifest["splits"][split]:
            raise DataError(f"{manifest_path}: no {split!r} shards (has: {', '.join(manifest['splits'])})")
        self.split, self.vocab_size, self.eos_id = split, manifest["vocab_size"], manifest["eos_id"]
        self.tokenizer_sha256 = manifest["tokenizer_sha256"]
        self.entries = manifest["splits"][split]
        self.arrays = [self._open(entry) for entry in self.entries]
        self.tokens = sum(len(a) for a in self.arrays)
        self.documents = sum(entry["documents"] for entry in self.entries)

    def _open(self, entry: dict) -> np.ndarray:
        if Path(entry["file"]).name != entry["file"] or entry["file"] in (".", ".."):
            raise UnsafeInputError(f"{self.directory / 'manifest.json'}: shard name {entry['file']!r} points outside "
                                   "the shard directory")
        path = self.directory / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard missing")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size:
            raise DataError(f"{path}: {size} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, itemsize, count, vocab, docs = HEADER.unpack(head)
        if magic != MAGIC:
            raise DataError(f"{path}: not a token shard (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"{path}: shard format version {version}, expected {VERSION}")
        expected = dtype_for(self.vocab_size).itemsize
        if itemsize != expected:
            raise DataError(f"{path}: {itemsize} bytes per token, expected {expected} for vocab {self.vocab_size}")
        if size != HEADER.size + count * itemsize:
            raise DataError(f"{path}: {size} bytes, expected {HEADER.size + count * itemsize} for the "
                            f"{count} tokens its header declares (truncated or padded)")
        for name, got, want in (("token count", count, entry["tokens"]), ("vocab size", vocab, self.vocab_size),
                                ("document count", docs, entry["documents"])):
            if got != want:
                raise DataError(f"{path}: header {name} {got}, manifest says {want}")
        digest, largest = hashlib.sha256(), -1
        with open(path, "rb") as f:  # one pass, 16 MiB at a time: checking a shard never holds it in memory
            digest.update(f.read(HEADER.size))
            while chunk := f.read(1 << 24):
                digest.update(chunk)
                largest = max(largest, int(np.frombuffer(chunk, dtype=f"<u{itemsize}").max()))
        if digest.hexdigest() != entry["sha256"]:
            raise DataError(f"{path}: sha256 {digest.hexdigest()[:12]}…, manifest says {entry['sha256'][:12]}… "
                            "(corrupt)")
        if largest >= self.vocab_size:
            raise DataError(f"{path}: token id {largest} is outside the vocabulary ({self.vocab_size})")
        # A read-only memory map: the corpus is paged in as training reads it, never loaded whole.
        return np.memmap(path, dtype=np.dtype(f"<u{itemsize}"), mode="r", offset=HEADER.size, shape=(count,))

    def documents_of(self, shard: int) -> list[np.ndarray]:
        """The documents of one shard, each ending with <|eos|>."""
        tokens = self.arrays[shard]
        ends = np.flatnonzero(tokens == self.eos_id) + 1
        return np.split(tokens, ends)[:-1] if len(ends) else []
