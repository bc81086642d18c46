"""FSDP (mmctl/train/fsdp.py): what `accelerate launch --use_fsdp` asks for is read or refused in one line, stages
that cannot shard refuse it, and the parameter memory each of 2 processes holds is what `mmctl account --zero 3`
predicts. (Training under FSDP equals one process: tests/stages/test_pretrain.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmctl.errors import UsageError  # noqa: E402
from mmctl.models.config import ModelConfig  # noqa: E402
from mmctl.runtime import Dist, fsdp_strategy  # noqa: E402


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"ACCELERATE_USE_FSDP": "true"}, "FULL_SHARD"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "2"}, "SHARD_GRAD_OP"),
    ({"ACCELERATE_USE_FSDP": "false", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, None),
])
def test_the_strategy_accelerate_asks_for(monkeypatch, env, expected):
    for key in ("ACCELERATE_USE_FSDP", "FSDP_SHARDING_STRATEGY", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert fsdp_strategy() == expected


@pytest.mark.parametrize("key, value, fragment", [("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD", "HYBRID_SHARD"),
                                                  ("FSDP_OFFLOAD_PARAMS", "true", "offload")])
def test_what_mmctl_does_not_do_is_refused(monkeypatch, key, value, fragment):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=fragment):
        fsdp_strategy()


def test_a_stage_that_cannot_shard_refuses_fsdp(tmp_path, monkeypatch):
    from mmctl.runtime import setup_distributed
    from mmctl.train.loop import Parts, Session, TrainConfig, train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="--multi_gpu"):  # as the stage starts, before it loads or writes anything
        setup_distributed("cpu")
    from mmctl.train.optim import OptimConfig

    with pytest.raises(UsageError, match="--multi_gpu"):  # before any collective: no process group needed
        train(Parts(torch.nn.Linear(2, 2), None, None), TrainConfig(steps=1), OptimConfig(),
              Session(tmp_path, print, Dist(0, 2, "cpu", "FULL_SHARD")))


@pytest.mark.slow
def test_each_process_holds_what_account_predicts_for_zero_3(tmp_path):
    """FULL_SHARD after an optimizer step: each process holds half of every parameter, gradient and AdamW moment,
    what ZeRO-3 over 2 GPUs predicts."""
    strategy = "FULL_SHARD"
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    env = {"OMP_NUM_THREADS": "1", "PATH": __import__("os").environ["PATH"], "HF_HUB_OFFLINE": "1"}
    worker = Path(__file__).with_name("fsdp_worker.py")
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_sharding_strategy",
                           strategy, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(worker), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert {r["strategy"] for r in ranks} == {strategy}
    account = subprocess.run([sys.executable, "-m", "mmctl", "account", str(tmp_path / "config.json"), "--num-gpus",
                              "2", "--zero", "3", "--precision", "fp32", "--json"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert account.returncode == 0, account.stderr
    predicted = json.loads(account.stdout)["memory"]["training"]
    whole = cfg.num_parameters() * 4
    assert (predicted["weights"], predicted["gradients"], predicted["optimizer"]) == (whole / 2, whole / 2, whole)
    for r in ranks:  # every matrix and vector here splits evenly in two: no padding
        assert (r["parameter_bytes"], r["gradient_bytes"], r["optimizer_bytes"]) == \
            (predicted["weights"], predicted["gradients"], predicted["optimizer"])
