"""Impossible output directories, signals outside the training loop, and recipes that validate but ask for what
no machine has: one line naming the path or field, the documented exit code, nothing half-written left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.cli import ENV, mmctl


@pytest.mark.parametrize("out", ["{file}", "{file}/sub", "/proc/mmctl-out", "/dev/null/x", "/sys/kernel/mmctl"])
def test_impossible_output_directories(tmp_path, out):
    (tmp_path / "afile").write_text("not a directory")
    out = out.format(file=tmp_path / "afile")
    done = mmctl("account", "gpt2", "--set", f"run.out={out}")
    assert done.returncode == 3, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and out.split("/sub")[0] in lines[0] and "Traceback" not in done.stderr


def test_sigterm_during_start_up_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: pretrain\ndata:\n  path: nowhere\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time, sys; sys.argv = ['mmctl', 'pretrain', "
                             f"{str(recipe)!r}]; from mmctl.cli import app; import mmctl.cli as c; "
                             "orig = c._run_stage; c._run_stage = lambda *a, **k: (time.sleep(30), orig(*a, **k)); "
                             "app()"], env=ENV, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # the command has started (its handler installed) and is busy
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mmctl import recipe
    from mmctl.stages import tokenize

    out = tmp_path_factory.mktemp("absurd") / "tokenize"
    cfg = {"run": {"out": str(out)}, "data": {"sources": [{"kind": "stories", "documents": 200}]},
           "tokenizer": {"vocab_size": 320}}
    tokenize.run(recipe.build(tokenize.TokenizeRecipe, cfg, recipe.Source("t", {}, set())))
    return out


@pytest.mark.parametrize("field, value", [("model.hidden_size", 1_000_000_000),
                                          ("model.vocab_size", 16_000_000_000), ("train.batch_size", 2**20),
                                          ("model.intermediate_size", 10**12)])
def test_a_model_no_machine_holds_is_refused_before_allocating(shards, tmp_path, field, value):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: pretrain\nrun:\n  out: {tmp_path / 'out'}\ndata:\n  path: {shards}\n"
                      "model:\n  vocab_size: 320\n  hidden_size: 64\n  intermediate_size: 128\n  num_heads: 4\n"
                      "train:\n  seq_len: 32\n  batch_size: 4\n")
    done = mmctl("pretrain", str(recipe), "--set", f"{field}={value}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs about" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
