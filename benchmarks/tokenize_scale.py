"""`mmctl tokenize` against input size: throughput and peak memory, one process and one per CPU, against the bare
`tokenizers` loop on the same text.

    python benchmarks/tokenize_scale.py 10 100          # sizes in MB (2000 for a 2 GB corpus: ~25 min here)

Each size is a generated text file of tiny stories (documents split at blank lines as they stream), encoded with
one existing tokenizer (trained first on a 5 MB corpus, not timed) into shards, four ways: mmctl in one process on
one thread (TOKENIZERS_PARALLELISM=false), mmctl in one process (the tokenizers library's threads inside
`encode_batch`), mmctl with one worker process per CPU (`shards.workers: auto`), and the ceiling: a bare Python
loop that reads the same file, splits it at blank lines and calls `Tokenizer.encode_batch` 1,024 documents at a
time, with the library's threads (no shards, no hashing, no split). Each run is its own process; the peak RSS is
the largest resident set of that process and of any worker it started (ru_maxrss of the children).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

MMCTL = [sys.executable, "-m", "mmctl"]


def corpus(path: Path, megabytes: int) -> float:
    from mmctl.data.synthetic import stories

    written, seed = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            for story in stories(10_000, seed):
                f.write(story + "\n\n")
                written += len(story.encode()) + 2
            seed += 1
    return written / 1e6


def train(tmp: Path) -> str:
    """A 4,096-token tokenizer (one token per digit) trained on a 5 MB corpus: what every measured run reuses."""
    corpus(tmp / "train.txt", 5)
    recipe = {"stage": "tokenize", "run": {"out": str(tmp / "trained")},
              "data": {"sources": [{"kind": "text", "path": str(tmp / "train.txt"), "separator": "\n\n"}]},
              "tokenizer": {"vocab_size": 4096, "pattern": "llama3-digits"}}
    (tmp / "train.yaml").write_text(yaml.safe_dump(recipe))
    subprocess.run([*MMCTL, "tokenize", str(tmp / "train.yaml")], capture_output=True, check=True)
    return str(tmp / "trained" / "tokenizer")


BARE = """
import sys
from tokenizers import Tokenizer
tok, batch = Tokenizer.from_file(sys.argv[1]), []
def flush():
    tok.encode_batch(batch, add_special_tokens=False)
    batch.clear()
with open(sys.argv[2], encoding="utf-8") as f:
    doc = []
    for line in f:
        if line == "\\n":
            batch.append("".join(doc).rstrip("\\n"))
            doc = []
            if len(batch) == 1024:
                flush()
        else:
            doc.append(line)
if doc:
    batch.append("".join(doc))
flush()
"""


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one process and its workers."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    seconds, kb = out.stdout.split()
    return float(seconds), int(kb) / 1024


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        tokenizer = train(tmp)
        for size in sizes:
            text = tmp / f"corpus-{size}.txt"
            mb = corpus(text, size)
            ways = (("mmctl, 1 process, 1 thread", 1, {"TOKENIZERS_PARALLELISM": "false"}),
                    ("mmctl, 1 process", 1, {}), ("mmctl, workers: auto", "auto", {}))
            for i, (name, workers, env) in enumerate(ways):
                recipe = {"stage": "tokenize", "run": {"out": str(tmp / f"out-{size}-{i}")},
                          "data": {"sources": [{"kind": "text", "path": str(text), "separator": "\n\n"}],
                                   "val_fraction": 0.01},
                          "tokenizer": {"path": tokenizer},
                          "shards": {"shard_tokens": 50_000_000, "workers": workers}}
                path = tmp / f"r-{size}-{i}.yaml"
                path.write_text(yaml.safe_dump(recipe))
                seconds, rss = run([*MMCTL, "tokenize", str(path), "--force"], env)
                results = json.loads((tmp / f"out-{size}-{i}" / "manifest.json").read_text())["results"]
                name += f" ({results['encode_workers']})" if workers == "auto" else ""
                rows.append((mb, name, seconds, results["encode_mb_per_s"], rss))
                print(rows[-1], file=sys.stderr, flush=True)
                shutil.rmtree(tmp / f"out-{size}-{i}")
            seconds, rss = run([sys.executable, "-c", BARE, str(Path(tokenizer) / "tokenizer.json"), str(text)])
            rows.append((mb, "bare encode_batch", seconds, mb / seconds, rss))
            text.unlink()
        print("| input (MB) | run | wall s | encode MB/s | peak RSS (MB) |")
        print("|---|---|---|---|---|")
        for mb, name, seconds, rate, rss in rows:
            print(f"| {mb:.0f} | {name} | {seconds:.1f} | {rate:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10, 100])
