"""Nothing lost: names that become paths stay inside the output dir, a failed re-run leaves the last good run as it
was (manifest, logs, products), and a directory holding another stage's run — or files of no run — is refused.
Each case runs the command as a user would and compares every file before and after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli import ENV, mmctl


def snapshot(root: Path) -> dict:
    """Every file under `root` (the lock aside) and its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def one_error(done: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert done.returncode == code, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def world(checkpoint, tmp_path_factory):
    """A base model, shards written by its tokenizer, and a finished quantize run (its good outputs)."""
    root = tmp_path_factory.mktemp("loss")
    tokenize = write(root / "tokenize.yaml", {
        "stage": "tokenize", "run": {"out": str(root / "tokenize")},
        "data": {"sources": [{"kind": "stories", "documents": 120}], "val_fraction": 0.2},
        "tokenizer": {"path": str(checkpoint)}})
    assert mmctl("tokenize", str(tokenize)).returncode == 0
    task = root / "task.jsonl"
    task.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    quantize = {"stage": "quantize", "run": {"out": str(root / "quantize"), "device": "cpu"}, "base": str(checkpoint),
                "methods": [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4, "group": 32}],
                "evaluation": {"data": str(root / "tokenize" / "shards"), "tokens": 200, "decode_tokens": 2,
                               "tasks": [{"kind": "generation", "data": str(task), "max_new_tokens": 2}]}}
    done = mmctl("quantize", str(write(root / "quantize.yaml", quantize)))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"root": root, "base": checkpoint, "quantize": quantize, "task": task}


@pytest.mark.parametrize("name", ["../victim", "{root}/victim", ".", "..", "a/b", "checkpoints", "manifest.json",
                                  "-", "x" * 101])
def test_a_method_name_never_names_a_path_outside_the_output_dir(world, tmp_path, name):
    root = world["root"]
    victim = root / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("keep me")
    before = snapshot(root)
    recipe = {**world["quantize"], "methods": [{"method": "rtn", "bits": 8, "name": name.format(root=root)}]}
    one_error(mmctl("quantize", str(write(tmp_path / "q.yaml", recipe))), 2, "methods[0].name")
    assert snapshot(root) == before  # the victim, and the finished run, untouched


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", "..", "phases"])
def test_a_phase_name_is_a_plain_name(world, tmp_path, name):
    recipe = {"stage": "align-vision", "run": {"out": str(tmp_path / "vlm")}, "base": str(world["base"]),
              "phases": [{"name": name, "sources": [{"kind": "shapes", "items": 8}]}]}
    one_error(mmctl("align-vision", str(write(tmp_path / "a.yaml", recipe))), 2, "phases[0].name")
    assert not (tmp_path / "vlm").exists()


def test_a_failed_rerun_keeps_the_good_runs_manifest_logs_and_outputs(world, tmp_path):
    out = world["root"] / "quantize"
    before = snapshot(out)
    assert json.loads((out / "manifest.json").read_text())["stage"] == "quantize"
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    recipe = {**world["quantize"], "methods": [{"method": "rtn", "bits": 4, "group": 32}],  # a new recipe ...
              "evaluation": {**world["quantize"]["evaluation"],
                             "tasks": [{"kind": "generation", "data": str(broken)}]}}  # ... whose task file is bad
    one_error(mmctl("quantize", str(write(tmp_path / "q.yaml", recipe))), 3, "broken.jsonl:1")
    assert snapshot(out) == before


def test_a_run_never_takes_over_another_stages_directory(world, tmp_path):
    out = world["root"] / "quantize"
    before = snapshot(out)
    recipe = {"stage": "sft", "run": {"out": str(out)}, "base": str(world["base"]),
              "data": {"sources": [{"kind": "arithmetic", "conversations": 20}]}, "train": {"steps": 1}}
    one_error(mmctl("sft", str(write(tmp_path / "s.yaml", recipe))), 2, "holds a `mmctl quantize` run")
    assert snapshot(out) == before


def test_a_directory_of_your_own_files_is_refused(world, tmp_path):
    home = tmp_path / "home"
    (home / "model").mkdir(parents=True)
    (home / "model" / "thesis.tex").write_text("years of work")
    before = snapshot(home)
    recipe = {**world["quantize"], "run": {"out": str(home), "device": "cpu"}}
    one_error(mmctl("quantize", str(write(tmp_path / "q.yaml", recipe))), 2, "no mmctl run's")
    assert snapshot(home) == before and not (home / ".lock").exists()


def test_a_fresh_run_whose_reward_raises_keeps_the_finished_run(world, tmp_path):
    """GRPO `--fresh` that fails at its first rollout: the finished run's record and model are as they were (its
    checkpoints are what --fresh asked to discard)."""
    base = world["base"]
    recipe = {"stage": "rl", "algorithm": "grpo", "run": {"out": str(tmp_path / "rl"), "device": "cpu"},
              "base": str(base), "grpo": {"group_size": 2, "max_completion_tokens": 2},
              "data": {"sources": [{"kind": "arithmetic", "problems": 8}], "val_fraction": 0},
              "train": {"steps": 1, "batch_size": 2, "seq_len": 48, "precision": "fp32"}}
    assert mmctl("rl", str(write(tmp_path / "ok.yaml", recipe))).returncode == 0
    keep = {k: v for k, v in snapshot(tmp_path / "rl").items() if not k.startswith("checkpoints/")}
    recipe["grpo"] |= {"allow_python_rewards": True, "rewards": [{"name": "tests.hostile.test_data_loss:boom"}]}
    done = mmctl("rl", str(write(tmp_path / "bad.yaml", recipe)), "--fresh")
    assert done.returncode != 0 and "boom" in done.stderr
    after = {k: v for k, v in snapshot(tmp_path / "rl").items() if not k.startswith("checkpoints/")}
    assert after == keep


def boom(completion: str, answer: str) -> float:
    raise RuntimeError("boom")


@pytest.mark.slow
def test_kill_9_inside_a_quantization_leaves_a_run_that_finishes_on_the_next_try(world, tmp_path):
    """SIGKILL once the first method's checkpoint is written (under .pending/): the finished run's manifest and
    products are still the old ones, and the same command then finishes cleanly and publishes the new ones."""
    import signal
    import time

    out = world["root"] / "quantize"
    before = snapshot(out)
    more = [{"method": "rtn", "bits": bits, "group": group, "name": f"new-{bits}-{group}"}  # work left after the
            for bits in (4, 3, 2) for group in (16, 32, 64)]                                # first: time to kill it
    recipe = {**world["quantize"], "methods": [{"method": "rtn", "bits": 8, "name": "new-a"}, *more]}
    path = write(tmp_path / "q.yaml", recipe)
    proc = subprocess.Popen([sys.executable, "-m", "mmctl", "quantize", str(path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / ".pending" / "new-a" / "config.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run never wrote its first method"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()  # a run was under way: the directory is not finished …
    kept = {k: v for k, v in snapshot(out).items() if k.split("/")[0] in ("rtn-8bit", "rtn-4bit-g32")}
    assert kept == {k: v for k, v in before.items() if k.split("/")[0] in ("rtn-8bit", "rtn-4bit-g32")}
    assert json.loads((out / "previous" / "manifest.json").read_text())["stage"] == "quantize"  # … the last one kept
    done = mmctl("quantize", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    names = {p.name for p in out.iterdir()}
    assert {"new-a", "new-2-64", "manifest.json"} <= names and not {"previous", ".pending", ".backup"} & names
