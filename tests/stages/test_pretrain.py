"""The pretrain stage end to end on a tiny model: outputs load in transformers, resume through the stage is
exact, runs repeat, non-finite losses exit 5, and two processes (gloo) train on the whole global batch."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from mmctl import recipe  # noqa: E402
from mmctl.errors import Interrupted  # noqa: E402
from mmctl.stages import Options, pretrain, tokenize  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")

TIMINGS = ("tok_s", "mfu")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenize"
    data = {"run": {"out": str(out)}, "data": {"sources": [{"kind": "stories", "documents": 300},
                                                           {"kind": "arithmetic", "documents": 200}]},
            "tokenizer": {"vocab_size": 320}}
    tokenize.run(recipe.build(tokenize.TokenizeRecipe, data, recipe.Source("t", {}, set())))
    return out


def recipe_data(shards, out, **train):
    return {
        "run": {"out": str(out), "seed": 3, "device": "cpu"},
        "data": {"path": str(shards)},
        "model": {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "max_position_embeddings": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"steps": 8, "batch_size": 4, "seq_len": 32, "precision": "fp32", "log_every": 1, "eval_every": 4,
                  "checkpoint_every": 2, **train},
        "eval": {"tokens": 256, "sample_tokens": 8},
    }


def config(shards, out, **train):
    return recipe.build(pretrain.PretrainRecipe, recipe_data(shards, out, **train), recipe.Source("r", {}, set()))


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def test_outputs(shards, tmp_path):
    result = pretrain.run(config(shards, tmp_path / "a"))
    out, results = result.out, result.results
    assert results["final"]["step"] == 8 and results["final"]["val_loss"] > 0
    assert results["memory"]["predicted_peak_bytes"] > 0 and results["throughput"]["measured_tok_s"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    assert model.num_parameters() == results["params"]
    assert tok.eos_token == "<|eos|>"
    assert pretrain.run(config(shards, tmp_path / "a")).up_to_date


def test_training_checkpoints_are_evaluable(shards, tmp_path):
    """A step dir holds config.json and the tokenizer: `mmctl eval` and `mmctl generate` take it as a model."""
    from mmctl import checkpoints

    out = pretrain.run(config(shards, tmp_path / "a")).out
    step = out / "checkpoints" / "step-000006"
    at_6 = checkpoints.load_lm(step)
    final = checkpoints.load_lm(out / "model")
    assert not torch.equal(at_6.lm_head.weight, final.lm_head.weight)
    run = [sys.executable, "-m", "mmctl"]
    scored = subprocess.run(run + ["eval", str(step), "--task", "stories-ppl", "--limit", "2", "--out",
                                   str(tmp_path / "e"), "--json"], capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["checkpoints"][str(step)]["tasks"]["stories-ppl"]["bits_per_byte"] > 0
    sample = subprocess.run(run + ["generate", str(step), "-p", "Once", "--max-new-tokens", "4", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0 and json.loads(sample.stdout)["completions"][0]["tokens"] > 0, sample.stderr


def test_validation_is_evals_perplexity(shards, tmp_path):
    """One bits-per-byte: pretrain's val numbers equal `mmctl eval`'s perplexity over the same documents."""
    from mmctl import checkpoints
    from mmctl.evals import perplexity
    from mmctl.tokenizer import bpe

    result = pretrain.run(config(shards, tmp_path / "a"))
    model, tok = checkpoints.load_lm(result.out / "model"), bpe.load(result.out / "model")
    documents = perplexity.shard_documents(shards / "shards", "val", tok, max_tokens=256)
    metrics, _ = perplexity.score(model, tok, documents, max_length=32, stride=32)
    assert result.results["final"]["val_loss"] == pytest.approx(metrics["nats_per_token"], rel=1e-5)
    assert result.results["final"]["val_bpb"] == pytest.approx(metrics["bits_per_byte"], rel=1e-5)


def test_same_recipe_twice_gives_identical_metrics(shards, tmp_path):
    pretrain.run(config(shards, tmp_path / "a"))
    pretrain.run(config(shards, tmp_path / "b"))
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    a = (tmp_path / "a" / "model" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model" / "model.safetensors").read_bytes()


def test_interrupt_and_resume_equals_uninterrupted(shards, tmp_path, monkeypatch):
    pretrain.run(config(shards, tmp_path / "full"))
    from mmctl.train import loss

    real = loss.linear_cross_entropy
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # during step 5 of 8
            signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss, "linear_cross_entropy", interrupting)
    with pytest.raises(Interrupted):
        pretrain.run(config(shards, tmp_path / "part"))
    monkeypatch.setattr(loss, "linear_cross_entropy", real)
    assert not (tmp_path / "part" / "manifest.json").exists()
    pretrain.run(config(shards, tmp_path / "part"))
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "part" / "model" / "model.safetensors").read_bytes() == full


def test_changed_model_refuses_to_resume(shards, tmp_path):
    pretrain.run(config(shards, tmp_path / "x"))
    (tmp_path / "x" / "manifest.json").unlink()
    data = recipe_data(shards, tmp_path / "x", steps=10)
    data["model"]["intermediate_size"] = 96
    cfg = recipe.build(pretrain.PretrainRecipe, data, recipe.Source("r", {}, set()))
    from mmctl.errors import UsageError

    with pytest.raises(UsageError, match="cannot resume: model changed"):
        pretrain.run(cfg)


def write_recipe(shards, tmp_path, out, **train):
    import yaml

    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({"stage": "pretrain", **recipe_data(shards, tmp_path / out, **train)}))
    return path


def test_nonfinite_loss_exits_5_and_keeps_a_complete_checkpoint(shards, tmp_path):
    path = write_recipe(shards, tmp_path, "nan", checkpoint_every=1)
    text = path.read_text().replace("lr: 0.003", "lr: 1.0e+30")
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "mmctl", "pretrain", str(path)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 5, out.stderr
    assert "is nan" in out.stderr or "is inf" in out.stderr
    from mmctl.train import checkpoint

    latest = checkpoint.latest(tmp_path / "nan" / "checkpoints")
    assert latest is not None and not (tmp_path / "nan" / "manifest.json").exists()


@pytest.mark.slow
def test_two_processes_train_on_the_whole_global_batch(shards, tmp_path):
    one = write_recipe(shards, tmp_path, "one", micro_batch_size=2, eval_every=100)
    two = write_recipe(shards, tmp_path, "two", eval_every=100)
    env = {"OMP_NUM_THREADS": "1", "PATH": __import__("os").environ["PATH"], "HF_HUB_OFFLINE": "1"}
    single = subprocess.run([sys.executable, "-m", "mmctl", "pretrain", str(one)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(launch("--multi_gpu") + ["-m", "mmctl", "pretrain", str(two)], capture_output=True,
                           text=True, timeout=600, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    # 2 processes × 2 rows = 1 process × 2 micro-batches × 2 rows: the same rows, so the same training
    a = [r for r in metrics(tmp_path / "one") if "loss" in r]
    b = [r for r in metrics(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                     rel=1e-4)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "one" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "model" / "model.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def launch(*flags) -> list[str]:
    """`accelerate launch` with two CPU processes, run as a module so the venv's copy is used whatever PATH says."""
    return [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2", "--num_machines",
            "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_resumes_and_saves_as_one_process_does(shards, tmp_path):
    """FULL_SHARD through `accelerate launch --use_fsdp`: sharded steps, evaluation on every process, a checkpoint
    gathered and then resumed into shards (4 steps, then on to 8) — the same losses, evaluations and weights as one
    process running the same two commands."""
    env = {"OMP_NUM_THREADS": "1", "PATH": __import__("os").environ["PATH"], "HF_HUB_OFFLINE": "1"}
    runs = {"one": [sys.executable, "-m", "mmctl", "pretrain"],
            "fsdp": launch("--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD") + ["-m", "mmctl", "pretrain"]}
    for name, command in runs.items():
        micro = {"micro_batch_size": 2} if name == "one" else {}
        for steps in (4, 8):  # the second run resumes the first's step-4 checkpoint
            path = write_recipe(shards, tmp_path, name, steps=steps, eval_every=2, checkpoint_every=4, **micro)
            done = subprocess.run(command + [str(path)], capture_output=True, text=True, timeout=600, env=env)
            assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "fsdp" / "manifest.json").read_text())
    assert manifest["results"]["processes"] == {"count": 2, "fsdp": "FULL_SHARD"}
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert [sorted(r) for r in a] == [sorted(r) for r in b] and any("val_loss" in r for r in b)
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)
        assert x.get("sample") == y.get("sample")
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "one" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "fsdp" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_force_after_a_finished_run_and_a_refused_resume_keep_the_results(shards, tmp_path):
    result = pretrain.run(config(shards, tmp_path / "f"))
    out, first = result.out, result.results
    manifest = (out / "manifest.json").read_text()
    result = pretrain.run(config(shards, tmp_path / "f"), Options(force=True))  # nothing left to train
    results = result.results
    assert results["final"]["step"] == 8 and results["final"]["loss"] == first["final"]["loss"]
    data = recipe_data(shards, tmp_path / "f")
    data["model"]["hidden_size"] = 64
    from mmctl.errors import UsageError

    with pytest.raises(UsageError, match="cannot resume: model changed"):
        pretrain.run(recipe.build(pretrain.PretrainRecipe, data, recipe.Source("r", {}, set())))
    assert json.loads((out / "manifest.json").read_text())["recipe"] == json.loads(manifest)["recipe"]


def test_fewer_steps_than_the_newest_checkpoint_is_refused_not_the_longer_model(shards, tmp_path):
    """A recipe lowered to 4 steps in a dir that holds step 8's checkpoint would resume past its end and publish
    the 8-step model as its own: refused, the finished run's record kept; --fresh trains the 4 steps."""
    from mmctl.errors import UsageError

    out = pretrain.run(config(shards, tmp_path / "r")).out
    manifest = (out / "manifest.json").read_text()
    with pytest.raises(UsageError, match="step-000008.* is past train.steps 4: --fresh starts over"):
        pretrain.run(config(shards, tmp_path / "r", steps=4))
    assert (out / "manifest.json").read_text() == manifest
    assert pretrain.run(config(shards, tmp_path / "r", steps=4), Options(fresh=True)).results["final"]["step"] == 4
