"""mmctl tokenize vs raw HF `tokenizers`, in one run on the same corpus: encode throughput and training time.

    python benchmarks/tokenize_bench.py            # ~20 MB corpus: 40k tiny stories + Python's reference text

mmctl's encode is the stage's whole path (read jsonl → encode_batch → append <|eos|> → shard files with
sha256), the reference is a bare loop (read jsonl → `Tokenizer.encode_batch` in batches of 1024). Training
compares mmctl's `make_tokenizer` (mixture, train, save, publish) with the bare `BpeTrainer` on the same text.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from mmctl import recipe
from mmctl.data.synthetic import stories
from mmctl.stages import tokenize


def corpus(directory: Path) -> Path:
    from pydoc_data.topics import topics

    path = directory / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in list(stories(40_000, 0)) + [topics[k] for k in sorted(topics)]:
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def raw_encode(tokenizer_json: Path, path: Path) -> float:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    start = time.perf_counter()
    batch = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == tokenize.BATCH:
                tok.encode_batch(batch, add_special_tokens=False)
                batch = []
    if batch:
        tok.encode_batch(batch, add_special_tokens=False)
    return time.perf_counter() - start


def raw_train(path: Path, vocab_size: int) -> float:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from mmctl.tokenizer.bpe import PATTERNS, SPECIAL_TOKENS

    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    start = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERNS["llama3"]), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                                       special_tokens=SPECIAL_TOKENS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return time.perf_counter() - start


def main(repeats: int = 3, vocab_size: int = 8192) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = corpus(tmp)
        mb = sum(len(json.loads(line)["text"].encode()) for line in open(path, encoding="utf-8")) / 1e6
        data = {"run": {"out": str(tmp / "out")}, "data": {"sources": [{"kind": "jsonl", "path": str(path)}],
                                                          "val_fraction": 0.0},
                "tokenizer": {"vocab_size": vocab_size}, "shards": {"shard_tokens": 10_000_000}}
        cfg = recipe.build(tokenize.TokenizeRecipe, data, recipe.Source("bench", {}, set()))
        train_mmctl, train_raw, enc_mmctl, enc_raw = [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            tok, _ = tokenize.make_tokenizer(cfg, tmp / "out")
            train_mmctl.append(time.perf_counter() - start)
            train_raw.append(raw_train(path, vocab_size))
            start = time.perf_counter()
            tokenize.encode(cfg, tok, tmp / "out")
            enc_mmctl.append(time.perf_counter() - start)
            enc_raw.append(raw_encode(tmp / "out" / "tokenizer" / "tokenizer.json", path))
        t_m, t_r = statistics.median(train_mmctl), statistics.median(train_raw)
        e_m, e_r = statistics.median(enc_mmctl), statistics.median(enc_raw)
        print(f"corpus: {mb:.1f} MB, vocab {vocab_size}, median of {repeats}\n")
        print("| measure | mmctl | tokenizers | mmctl / tokenizers |")
        print("|---|---|---|---|")
        print(f"| encode throughput (MB/s) | {mb / e_m:.2f} | {mb / e_r:.2f} | {e_r / e_m:.2f}× |")
        print(f"| BPE training time (s) | {t_m:.1f} | {t_r:.1f} | {t_m / t_r:.2f}× the time |")


if __name__ == "__main__":
    main()
