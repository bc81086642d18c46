"""Stress (marked `slow`; the default test run includes it, so CI runs it once): kill -9 a pretraining run at
random moments — inside checkpoint saves too — twenty times, resuming after each; the final weights and metrics
equal an uninterrupted run's. And two runs on one output directory: the second is refused at once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch  # noqa: E402
import yaml

pytestmark = pytest.mark.slow

from mmctl import recipe  # noqa: E402
from mmctl.stages import tokenize  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("stress") / "tokenize"
    cfg = {"run": {"out": str(out)}, "data": {"sources": [{"kind": "stories", "documents": 300}]},
           "tokenizer": {"vocab_size": 320}}
    tokenize.run(recipe.build(tokenize.TokenizeRecipe, cfg, recipe.Source("t", {}, set())))
    return out


def write_recipe(data: Path, out: Path) -> Path:
    body = {"stage": "pretrain", "run": {"out": str(out), "seed": 1, "device": "cpu"}, "data": {"path": str(data)},
            "model": {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                      "num_heads": 4, "num_kv_heads": 2, "max_position_embeddings": 64},
            "optim": {"lr": 3e-3, "warmup_steps": 2},
            "train": {"steps": 60, "batch_size": 4, "seq_len": 32, "precision": "fp32", "log_every": 1,
                      "eval_every": 1000, "checkpoint_every": 1, "keep_checkpoints": 2},
            "eval": {"tokens": 64, "sample_tokens": 2}}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(body))
    return path


def pretrain(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmctl", "pretrain", str(path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def losses(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def test_twenty_kills_and_resumes_equal_one_run(data, tmp_path):
    full = write_recipe(data, tmp_path / "full")
    assert pretrain(full).wait(timeout=600) == 0
    path = write_recipe(data, tmp_path / "killed")
    rng = random.Random(0)
    kills = in_save = 0
    while kills < 20:
        proc = pretrain(path)
        if kills % 4 == 3:  # every fourth kill lands inside a checkpoint write, as soon as one is seen
            deadline = time.time() + 20
            ckpts = tmp_path / "killed" / "checkpoints"
            while proc.poll() is None and time.time() < deadline and not list(ckpts.glob(".step-*.tmp-*")):
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(2.0, 6.0))  # start-up, training or a checkpoint write: wherever it is
        if proc.poll() is not None:  # finished before the kill: start over from scratch to keep killing
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
            (tmp_path / "killed" / "manifest.json").unlink()
            for ckpt in (tmp_path / "killed" / "checkpoints").iterdir():
                __import__("shutil").rmtree(ckpt)
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        in_save += bool(list((tmp_path / "killed" / "checkpoints").glob(".step-*.tmp-*")))
    done = pretrain(path)
    assert done.wait(timeout=600) == 0, done.stderr.read()[-2000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert in_save >= 3, f"only {in_save} of the kills landed inside a checkpoint write"


def test_a_second_run_on_the_same_directory_is_refused(data, tmp_path):
    path = write_recipe(data, tmp_path / "busy")
    first = pretrain(path)
    deadline = time.time() + 120
    while not (tmp_path / "busy" / "metrics.jsonl").exists():  # the first run holds the directory by now
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.1)
    second = pretrain(path)
    assert second.wait(timeout=120) == 6
    assert "another mmctl process is using this output directory" in second.stderr.read()
    assert first.wait(timeout=600) == 0
    assert (tmp_path / "busy" / "manifest.json").exists()
