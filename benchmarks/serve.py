"""`mmctl serve` under load: tokens/s with 8 concurrent clients against one client asking in turn, a 200-request
burst, and what a full queue does — all through the official `openai` client, against a real server process.

The model is the tiny recipe's shape (4.0M parameters, random weights: speed does not depend on what it learned)
with a small trained BPE, saved as a chat model. Completions ask for a fixed number of tokens from distinct
prompts; a random model rarely ends a turn early, and tokens are counted from each response's `usage`, so an
early end is counted as what it is. One sequential client and 8 concurrent ones take turns, --repeats times;
each number is the median.

    python benchmarks/serve.py              # prints the table recorded in benchmarks/serve.md
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import openai  # noqa: E402
import torch  # noqa: E402

from mmctl import checkpoints  # noqa: E402
from mmctl.data.synthetic import arithmetic, stories  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from mmctl.tokenizer import bpe  # noqa: E402

TINY = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                   num_kv_heads=4, max_position_embeddings=512)


def make_checkpoint(root: Path) -> Path:
    bpe.save(bpe.train(list(stories(2000, 0)) + list(arithmetic(2000, 0)), vocab_size=TINY.vocab_size),
             root / "tok", 512)
    torch.manual_seed(0)
    return checkpoints.save(Transformer(TINY), root / "model", bpe.load(root / "tok"), chat=True)


class Server:
    def __init__(self, checkpoint: Path, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "mmctl", "serve", str(checkpoint), "--port", "0",
                                      "--name", "tiny", *args], stderr=subprocess.PIPE, text=True)
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            if found := re.search(r"at (http://\S+/v1)", line):
                self.url = found.group(1)
                break
        else:
            raise SystemExit("the server did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=600)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def ask(client, i: int, tokens: int) -> int:
    done = client.completions.create(model="tiny", prompt=f"Once upon a time, story {i}", max_tokens=tokens,
                                     temperature=0)
    return done.usage.completion_tokens


def rate(client, clients: int, requests: int, tokens: int) -> float:
    """Completion tokens/s with `clients` asking at once, `requests` each."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(lambda i: ask(client, i, tokens), range(clients * requests)))
    return sum(counts) / (time.perf_counter() - start)


def burst(client, n: int) -> tuple[int, int, float]:
    """(answered, refused with 503, seconds) for `n` requests sent at once."""
    def one(i: int) -> str:
        try:
            ask(client, i, 4)
            return "ok"
        except openai.APIStatusError as e:
            return str(e.status_code)

    start = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(n)))
    return results.count("ok"), results.count("503"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--requests", type=int, default=3, help="requests per client per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mmctl-serve-bench-"))
    checkpoint = make_checkpoint(root)

    server = Server(checkpoint, "--batch-size", "8")
    ask(server.client, -1, 4)  # warm-up
    one, eight = [], []
    for _ in range(args.repeats):
        one.append(rate(server.client, 1, args.requests * 2, args.tokens))
        eight.append(rate(server.client, 8, args.requests, args.tokens))
    rss_before = server.rss_mb()
    answered, refused, seconds = burst(server.client, 200)
    rss_after = server.rss_mb()
    server.stop()

    small = Server(checkpoint, "--batch-size", "8", "--queue", "16")  # a queue smaller than the burst
    s_answered, s_refused, _ = burst(small.client, 200)
    small_rss = small.rss_mb()
    small.stop()

    ratio = statistics.median(eight) / statistics.median(one)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{args.tokens} tokens per request, median of {args.repeats}\n")
    print("| measurement | value |\n|---|---:|")
    print(f"| 1 client, requests in turn: completion tok/s | {statistics.median(one):,.0f} |")
    print(f"| 8 concurrent clients: completion tok/s | {statistics.median(eight):,.0f} |")
    print(f"| 8 clients ÷ 1 client | **{ratio:.2f}×** |")
    print(f"| burst of 200 requests (queue 256): answered / refused | {answered} / {refused} in {seconds:.1f} s |")
    print(f"| server memory before / after the burst | {rss_before:,.0f} MB / {rss_after:,.0f} MB |")
    print(f"| burst of 200 with --queue 16: answered / refused 503 (Retry-After) | {s_answered} / {s_refused} |")
    print(f"| server memory after it | {small_rss:,.0f} MB |")


if __name__ == "__main__":
    main()
