"""Atomic writes, published directories, manifests and the up-to-date rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmctl import artifacts
from mmctl.artifacts import StageDir
from mmctl.errors import UsageError


def test_atomic_write_leaves_no_temp_and_survives_a_failed_replace(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    artifacts.atomic_write_json(target, {"v": 1})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        artifacts.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.slow
def test_sigkill_during_a_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    child = (
        "import os, sys, time\n"
        "import mmctl.artifacts as a\n"
        "os.fsync = lambda fd: time.sleep(60)  # stall after the bytes are written, before the rename\n"
        f"a.atomic_write_bytes({str(target)!r}, b'new' * 100000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.time() + 30
    while not any(p.name.startswith(".weights.bin.tmp") for p in tmp_path.iterdir()):
        assert time.time() < deadline, "the child never started writing"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old"


def test_publish_dir_replaces_whole(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staging = tmp_path / ".model.tmp"
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    artifacts.publish_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sha256_path_of_a_directory_depends_on_names_and_contents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_text("1")
    h1 = artifacts.sha256_path(tmp_path / "d")
    (tmp_path / "d" / "a").write_text("2")
    h2 = artifacts.sha256_path(tmp_path / "d")
    (tmp_path / "d" / "a").rename(tmp_path / "d" / "b")
    h3 = artifacts.sha256_path(tmp_path / "d")
    assert len({h1, h2, h3}) == 3


def test_run_up_to_date_rule(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("hello")
    out = tmp_path / "out"

    def run(recipe):
        return StageDir(out, "tokenize", recipe, inputs={"data": data}, seed=1)

    r = run({"a": 1})
    assert not r.up_to_date()
    r.begin()
    r.log({"step": 1, "loss": 2.0})
    assert not r.up_to_date()  # no manifest yet: a half-done run is never done
    r.finish({"tokens": 5})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "tokenize" and manifest["results"] == {"tokens": 5}
    assert manifest["inputs"]["data"]["sha256"] == artifacts.sha256_file(data)
    assert {"python", "mmctl"} <= set(manifest["versions"])
    assert (out / "recipe.yaml").exists() and (out / "metrics.jsonl").read_text().count("\n") == 1
    del r  # releases the directory's lock
    assert run({"a": 1}).up_to_date()
    assert not run({"a": 2}).up_to_date()
    with pytest.raises(UsageError, match="holds a `mmctl tokenize` run"):  # another stage's run is not touched
        StageDir(out, "pretrain", {"a": 1}, inputs={"data": data})
    data.write_text("changed")
    assert not run({"a": 1}).up_to_date()
    run({"a": 1}).begin()  # a re-run claims the directory: the manifest is gone at once (kept in previous/)
    assert not (out / "manifest.json").exists()
    assert json.loads((out / "previous" / "manifest.json").read_text())["results"] == {"tokens": 5}


def test_an_unchanged_input_file_is_not_read_again(tmp_path, monkeypatch):
    """A re-run hashes only the files whose size or modification time changed since this dir's last run (a file
    rewritten with the same size but a new time is read again)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt"):
        (corpus / name).write_text(name * 100)
    out = tmp_path / "out"
    read = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: read.append(Path(p).name) or real(p))

    def run():
        return StageDir(out, "tokenize", {"a": 1}, inputs={"data": corpus}, seed=1)

    first = run()
    first.begin()
    first.finish({})
    digest = first.inputs["data"]["sha256"]
    del first
    assert sorted(read) == ["a.txt", "b.txt"]
    read.clear()
    again = run()
    assert again.up_to_date() and again.inputs["data"]["sha256"] == digest and read == []
    del again
    stat = (corpus / "b.txt").stat()
    (corpus / "b.txt").write_text("B" * stat.st_size)  # the same size, other bytes …
    os.utime(corpus / "b.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # … and a later time
    changed = run()
    assert read == ["b.txt"] and not changed.up_to_date()
    assert changed.inputs["data"]["sha256"] == artifacts.sha256_path(corpus)


def test_missing_input_is_a_data_error(tmp_path):
    from mmctl.errors import DataError

    with pytest.raises(DataError, match="input not found"):
        StageDir(tmp_path / "out", "x", {}, inputs={"data": tmp_path / "nope"})


def test_a_second_run_on_a_directory_in_use_is_refused(tmp_path):
    from mmctl.errors import BusyError

    first = StageDir(tmp_path / "out", "x", {})
    with pytest.raises(BusyError) as e:
        StageDir(tmp_path / "out", "x", {})
    assert e.value.exit_code == 6 and "another mmctl process" in str(e.value)
    del first  # the lock goes with the process (or its Run)
    StageDir(tmp_path / "out", "x", {})


def test_begin_removes_what_a_killed_publish_left(tmp_path):
    run = StageDir(tmp_path, "x", {})
    (tmp_path / ".model.tmp-999").mkdir()
    (tmp_path / ".results.json.tmp-999").write_text("half")
    (tmp_path / ".pending").mkdir()
    run.begin()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".backup", ".lock", "metrics.jsonl", "recipe.yaml"]


def test_tensor_files_honour_the_umask(tmp_path):
    import os

    import torch

    from mmctl.artifacts import save_tensors

    old = os.umask(0o022)
    try:
        save_tensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


def _finished(out, recipe, results, product="model"):
    """A StageDir with a finished run in `out` whose product dir holds one file saying `results`."""
    d = StageDir(out, "x", recipe)
    d.begin()
    d.log({"step": 1, "loss": 1.0})
    (d.product(product)).mkdir()
    (d.product(product) / "weights").write_text(str(results))
    d.finish({"v": results})
    return d


def test_a_failed_rerun_leaves_the_finished_run_as_it_was(tmp_path):
    out = tmp_path / "out"
    del_me = _finished(out, {"a": 1}, 1)
    del del_me
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    d = StageDir(out, "x", {"a": 2})
    d.begin()
    d.log({"step": 1, "loss": 9.0})
    (d.product("model")).mkdir()
    assert not (out / "manifest.json").exists()  # while it runs, the directory is not finished
    assert d.abandon(saved_progress=False) is False
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "metrics.jsonl", "model",
                                                     "recipe.yaml"]


def test_a_run_that_saved_progress_keeps_the_finished_record_in_previous(tmp_path):
    out = tmp_path / "out"
    del_me = _finished(out, {"a": 1}, 1)
    del del_me
    d = StageDir(out, "x", {"a": 2})
    d.begin()
    d.log({"step": 1, "loss": 9.0})
    assert d.abandon(saved_progress=True) is True
    assert json.loads((out / "previous" / "manifest.json").read_text())["results"] == {"v": 1}
    assert (out / "model" / "weights").read_text() == "1"  # the products are the finished run's until one finishes
    assert "9.0" in (out / "metrics.jsonl").read_text() and not (out / "manifest.json").exists()
    del d
    d = StageDir(out, "x", {"a": 2})  # and the next run to finish replaces both
    d.begin(keep_logs_through=1)
    (d.product("model")).mkdir()
    (d.product("model") / "weights").write_text("2")
    d.finish({"v": 2})
    assert (out / "model" / "weights").read_text() == "2"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "metrics.jsonl", "model",
                                                     "recipe.yaml"]


@pytest.mark.parametrize("name", ["../victim", "/tmp/x", ".", "..", "", "a/b", "manifest.json", "checkpoints",
                                  "previous", "x" * 101, "a\x00b", "-rf"])
def test_product_names_are_plain_names_inside_the_directory(tmp_path, name):
    d = StageDir(tmp_path / "out", "x", {})
    d.begin()
    with pytest.raises(UsageError):
        d.product(name)
    assert artifacts.name_problem("gptq-4bit-g64") is None


def test_a_directory_of_another_stage_or_of_no_stage_is_refused(tmp_path):
    _finished(tmp_path / "pretrain", {"a": 1}, 1)
    with pytest.raises(UsageError, match="holds a `mmctl x` run"):
        StageDir(tmp_path / "pretrain", "sft", {})
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="no mmctl run's"):
        StageDir(tmp_path / "home", "x", {})
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"
