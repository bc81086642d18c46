"""The tokenize stage end to end: shards decode back to the documents, runs are byte-identical, reruns are up
to date, a failed encode leaves nothing that looks finished, and errors have the right exit codes."""

import json

import pytest

from mmctl import recipe
from mmctl.data.sources import mixture
from mmctl.stages import tokenize
from mmctl.tokenizer import bpe
from mmctl.tokenizer.shards import Shards
from tests.cli import mmctl


def config(tmp_path, out="out", **tokenizer):
    (tmp_path / "notes.txt").write_text("first note\n\nsecond note, with ünïcode\n\nthird")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"body": f"line {i} {'x' * i}"}) for i in range(30)))
    data = {
        "run": {"out": str(tmp_path / out), "seed": 1},
        "data": {"sources": [{"kind": "stories", "documents": 150}, {"kind": "arithmetic", "documents": 100},
                             {"kind": "text", "path": str(tmp_path / "notes.txt"), "separator": "\n\n"},
                             {"kind": "jsonl", "path": str(tmp_path / "chat.jsonl"), "field": "body", "weight": 2}],
                 "val_fraction": 0.1},
        "tokenizer": {"vocab_size": 400, **tokenizer},
        "shards": {"shard_tokens": 3000},
    }
    return recipe.build(tokenize.TokenizeRecipe, data, recipe.Source("r.yaml", {}, set()), stage="tokenize")


def test_shards_decode_back_to_the_documents(tmp_path):
    cfg = config(tmp_path)
    result = tokenize.run(cfg)
    out, results = result.out, result.results
    tok = bpe.load(out / "tokenizer")
    expected = {"train": [], "val": []}
    for split, _, doc in mixture(cfg.data.sources, cfg.run.seed, cfg.data.val_fraction):
        expected[split].append(doc)
    for split in ("train", "val"):
        shards = Shards(out / "shards", split, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
        docs = [tok.decode(d[:-1].tolist()) for i in range(len(shards.arrays)) for d in shards.documents_of(i)]
        assert docs == expected[split]
        assert results["splits"][split]["documents"] == len(docs)
        assert results["splits"][split]["tokens"] == shards.tokens
    assert len(Shards(out / "shards", "train").arrays) > 1
    assert 1.0 < results["bytes_per_token"] < 10 and 0 < results["vocab_coverage"] <= 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"]["tokenizer"]["sha256"] == tok.sha256
    assert any(k.startswith("sources[2]") for k in manifest["inputs"])


def test_same_recipe_and_seed_give_byte_identical_outputs(tmp_path):
    result = tokenize.run(config(tmp_path, "a"))
    a, _ = result.out, result.results
    result = tokenize.run(config(tmp_path, "b"))
    b, _ = result.out, result.results
    files = sorted(str(p.relative_to(a)) for p in (a / "shards").iterdir()) + ["tokenizer/tokenizer.json"]
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_worker_processes_write_the_same_shards_as_one(tmp_path, monkeypatch):
    """Encoding in two processes, batches of 50 documents (8 batches in flight at most 4), gives byte-identical
    shards and the same corpus report as one process."""
    monkeypatch.setattr(tokenize, "BATCH", 50)
    one = tokenize.run(config(tmp_path, "one"))
    cfg = config(tmp_path, "two")
    cfg.shards.workers = 2
    two = tokenize.run(cfg)
    assert two.results["encode_workers"] == 2 and one.results["encode_workers"] == 1
    assert two.results["splits"] == one.results["splits"] and two.results["vocab_coverage"] == one.results[
        "vocab_coverage"]
    same_shards(one.out, two.out)


def test_rerun_is_up_to_date_until_an_input_changes(tmp_path):
    cfg = config(tmp_path)
    tokenize.run(cfg)
    assert tokenize.run(cfg).up_to_date
    (tmp_path / "notes.txt").write_text("a changed note")
    assert not tokenize.run(cfg).up_to_date


def test_reusing_a_tokenizer_gives_the_same_ids(tmp_path):
    result = tokenize.run(config(tmp_path, "first"))
    first, _ = result.out, result.results
    result = tokenize.run(config(tmp_path, "second", path=str(first / "tokenizer")))
    second, _ = result.out, result.results
    assert (first / "shards" / "train-00000.bin").read_bytes() == (second / "shards" / "train-00000.bin").read_bytes()


def test_a_failed_encode_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    calls = []

    def fail_on_second(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self)

    original = tokenize.ShardWriter._flush
    monkeypatch.setattr(tokenize.ShardWriter, "_flush", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        tokenize.run(cfg)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / "shards").exists()
    assert not (out / ".shards.tmp" / "manifest.json").exists()




def same_shards(a, b) -> None:
    names = sorted(p.name for p in (a / "shards").iterdir())
    assert names == sorted(p.name for p in (b / "shards").iterdir()) and len(names) > 3
    for name in names:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name


@pytest.mark.parametrize("where", ["finishing a shard", "saving the progress"])
def test_an_interrupted_run_continues_from_its_last_saved_shard(tmp_path, monkeypatch, where):
    """Interrupted as its third shard is finished — or after a shard was finished but before the progress was
    saved, so the saved state's open shard is finished on disk and a later one is open — the next run continues
    from the saved progress (not from zero) and writes the shards and report of a run never interrupted."""
    whole = tokenize.run(config(tmp_path, "whole"))
    calls = []

    def interrupt_third(original):
        def wrapper(self, *args):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return original(self, *args)
        return wrapper

    target = (tokenize.ShardWriter, "_flush") if where == "finishing a shard" else (tokenize.Work, "save")
    with monkeypatch.context() as m:
        m.setattr(*target, interrupt_third(getattr(*target)))
        with pytest.raises(KeyboardInterrupt):
            tokenize.run(config(tmp_path))
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists() and not (out / "shards").exists()
    saved = json.loads((out / "checkpoints" / "progress.json").read_text())
    assert saved["documents"] > 0
    resumed = tokenize.run(config(tmp_path))
    assert resumed.results["resumed_at_document"] == saved["documents"]
    assert resumed.results["splits"] == whole.results["splits"]
    assert resumed.results["vocab_coverage"] == whole.results["vocab_coverage"]
    same_shards(resumed.out, whole.out)
    tokenizer = "tokenizer/tokenizer.json"
    assert (out / tokenizer).read_bytes() == (whole.out / tokenizer).read_bytes()
    assert not (out / "checkpoints").exists()


def test_another_recipe_or_fresh_starts_over(tmp_path, monkeypatch):
    def interrupt_second_save(self, progress):
        if progress["splits"] is not None:
            raise KeyboardInterrupt
        original(self, progress)

    original = tokenize.Work.save
    for change in ("another seed", "--fresh"):
        with monkeypatch.context() as m:
            m.setattr(tokenize.Work, "save", interrupt_second_save)
            with pytest.raises(KeyboardInterrupt):
                tokenize.run(config(tmp_path))
        cfg = config(tmp_path)
        options = tokenize.Options()
        if change == "another seed":
            cfg.run.seed = 2
        else:
            options = tokenize.Options(fresh=True)
        assert (tmp_path / "out" / "checkpoints" / "progress.json").exists()
        result = tokenize.run(cfg, options)
        assert result.results["resumed_at_document"] is None


@pytest.mark.slow
def test_kill_9_mid_corpus_continues_from_the_last_shard(tmp_path):
    """SIGKILL once a shard is finished and saved: the next `mmctl tokenize` says it resumes, and its shards are
    byte for byte those of a run never killed."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from tests.cli import ENV

    base = tokenize.run(config(tmp_path, "tok")).out / "tokenizer"
    for out in ("whole", "killed"):
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump({
            "stage": "tokenize", "run": {"out": str(tmp_path / out)},
            "data": {"sources": [{"kind": "stories", "documents": 20000}], "val_fraction": 0.05},
            "tokenizer": {"path": str(base)}, "shards": {"shard_tokens": 100_000}}))
    assert mmctl("tokenize", str(tmp_path / "whole.yaml")).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "mmctl", "tokenize", str(tmp_path / "killed.yaml")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress, deadline = tmp_path / "killed" / "checkpoints" / "progress.json", time.time() + 300
    while not (progress.exists() and json.loads(progress.read_text())["splits"]):
        assert proc.poll() is None and time.time() < deadline, "the run never saved a finished shard"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    done = mmctl("tokenize", str(tmp_path / "killed.yaml"))
    assert done.returncode == 0 and "resuming:" in done.stderr, done.stderr[-2000:]
    resumed = json.loads((tmp_path / "killed" / "manifest.json").read_text())["results"]
    assert 0 < resumed["resumed_at_document"] < 20000
    same_shards(tmp_path / "whole", tmp_path / "killed")


@pytest.mark.parametrize("sources, code, fragment", [
    ("[{kind: text, path: missing.txt}]", 3, "missing.txt: no such file"),
    ("[{kind: jsonl, path: d.jsonl, field: text}]", 3, "d.jsonl:1: missing field 'text' (has: body)"),
    ("[]", 2, "data.sources: missing required value"),
    ("[{kind: stories}]", 2, "data.sources[0].documents: missing required value"),
    ("[{kind: storys, documents: 3}]", 2, "'storys' is not one of"),
])
def test_cli_errors(tmp_path, sources, code, fragment):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "r.yaml").write_text(f"stage: tokenize\ndata:\n  sources: {sources}\ntokenizer:\n  vocab_size: 300\n")
    out = mmctl("tokenize", "r.yaml", cwd=tmp_path)
    assert out.returncode == code, out.stderr
    assert fragment in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """A 5 MB and a 50 MB text corpus (one shard each: nothing flushes early) tokenize at the same peak RSS
    within 10 MB — sources stream, and a shard is written as its documents come, not held until it is full."""
    import subprocess
    import sys

    import yaml

    from mmctl.data.synthetic import stories

    base = tokenize.run(config(tmp_path, "tok")).out / "tokenizer"
    peaks = []
    for megabytes in (5, 50):
        text = tmp_path / f"c{megabytes}.txt"
        with open(text, "w", encoding="utf-8") as f:
            written, seed = 0, 0
            while written < megabytes * 1e6:
                block = "\n\n".join(stories(2000, seed)) + "\n\n"
                f.write(block)
                written, seed = written + len(block.encode()), seed + 1
        recipe_path = tmp_path / f"r{megabytes}.yaml"
        recipe_path.write_text(yaml.safe_dump({
            "stage": "tokenize", "run": {"out": str(tmp_path / f"o{megabytes}")},
            "data": {"sources": [{"kind": "text", "path": str(text), "separator": "\n\n"}], "val_fraction": 0.01},
            "tokenizer": {"path": str(base)}, "shards": {"shard_tokens": 10**9}}))
        probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True); "
                 "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "mmctl", "tokenize",
                              str(recipe_path)], capture_output=True, text=True, check=True)
        code, kb = map(int, out.stdout.split())
        assert code == 0
        peaks.append(kb / 1024)
    assert peaks[1] - peaks[0] < 10, peaks  # (holding the 50 MB corpus's shard in memory: +20 MB)
