"""`mmctl tokenize` against input size: throughput and peak memory, one process and one per CPU.

    python benchmarks/tokenize_scale.py 10 100          # sizes in MB (1000 for a 1 GB corpus: ~10 min here)

Each size is a generated text file of tiny stories (documents split at blank lines as they stream), encoded with
one existing tokenizer (trained first on a 5 MB corpus, not timed) into shards. Each run is its own `mmctl
tokenize` process; the peak RSS is the largest resident set of that process and of any worker it started
(ru_maxrss of the children, so the main process's when it is the largest).
"""

from __future__ import annotations

import json
import os
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


def run(recipe: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one `mmctl tokenize` process and its workers."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *MMCTL, "tokenize", str(recipe), "--force"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
            for workers in (1, "auto"):
                recipe = {"stage": "tokenize", "run": {"out": str(tmp / f"out-{size}-{workers}")},
                          "data": {"sources": [{"kind": "text", "path": str(text), "separator": "\n\n"}],
                                   "val_fraction": 0.01},
                          "tokenizer": {"path": tokenizer},
                          "shards": {"shard_tokens": 50_000_000, "workers": workers}}
                path = tmp / f"r-{size}-{workers}.yaml"
                path.write_text(yaml.safe_dump(recipe))
                seconds, rss = run(path)
                results = json.loads((tmp / f"out-{size}-{workers}" / "manifest.json").read_text())["results"]
                rows.append((mb, results["encode_workers"], seconds, results["encode_mb_per_s"], rss))
            text.unlink()
        print("| input (MB) | processes | wall s | encode MB/s | peak RSS (MB) |")
        print("|---|---|---|---|---|")
        for mb, workers, seconds, rate, rss in rows:
            print(f"| {mb:.0f} | {workers} | {seconds:.1f} | {rate:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10, 100])
