"""The training loop with a toy model: bit-exact resume, NaN stops before the step, signals save and exit 75,
a killed checkpoint write is never resumed, and the same run twice logs the same numbers."""

from __future__ import annotations

import json
import signal

import pytest

torch = pytest.importorskip("torch")

from mmctl.errors import Interrupted, NonFiniteError, UsageError  # noqa: E402
from mmctl.train import checkpoint  # noqa: E402
from mmctl.train.loop import TrainConfig, train  # noqa: E402
from mmctl.train.optim import OptimConfig  # noqa: E402

V, T = 32, 8


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, V)

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


def batches(step, micro, rank):
    g = torch.Generator().manual_seed(step * 1000 + micro * 10 + rank)
    x = torch.randint(0, V, (4, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def loss_fn(model, inputs, targets):
    return torch.nn.functional.cross_entropy(model(inputs).reshape(-1, V), targets.reshape(-1))


def run(out, steps=12, log=None, loss=loss_fn, **train_kw):
    torch.set_num_threads(1)
    model = Toy()
    records = [] if log is None else log
    cfg = TrainConfig(steps=steps, batch_size=4, micro_batch_size=2, seq_len=T, log_every=1, checkpoint_every=4,
                      keep_checkpoints=2)
    train(model, cfg=cfg, optim=OptimConfig(lr=1e-2, warmup_steps=2), batches=batches, loss_fn=loss,
          out=out, log=records.append, fingerprint={"model": "toy"}, **train_kw)
    return model, records


def losses(records):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if "loss" in r]


def interrupt_during_step(n):
    """A loss function that sends SIGTERM while step `n` runs (2 micro-batches per step)."""
    calls = []

    def loss(model, inputs, targets):
        calls.append(1)
        if len(calls) == 2 * n - 1:
            signal.raise_signal(signal.SIGTERM)
        return loss_fn(model, inputs, targets)

    return loss


def test_resume_is_bit_exact(tmp_path):
    full_model, full = run(tmp_path / "full")
    with pytest.raises(Interrupted):  # the same 12-step run, stopped after step 6
        first = []
        run(tmp_path / "part", log=first, loss=interrupt_during_step(6))
    resumed_model, second = run(tmp_path / "part")
    assert losses(first) + losses(second) == losses(full)  # exactly, not approximately
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_same_run_twice_logs_the_same(tmp_path):
    _, a = run(tmp_path / "a")
    _, b = run(tmp_path / "b")
    assert losses(a) == losses(b)


def test_nan_stops_before_the_step_and_keeps_the_checkpoint(tmp_path):
    run(tmp_path, steps=4)  # a checkpoint at step 4
    before = {p.name: p.read_bytes() for p in checkpoint.latest(tmp_path / "checkpoints").iterdir()}

    def poisoned(model, inputs, targets):
        loss = loss_fn(model, inputs, targets)
        return loss * float("nan") if torch.rand(()) < 2 else loss  # always NaN from the resumed step on

    with pytest.raises(NonFiniteError) as e:
        run(tmp_path, steps=12, loss=poisoned)
    assert e.value.exit_code == 5 and "step 5: loss is nan" in str(e.value)
    latest = checkpoint.latest(tmp_path / "checkpoints")
    assert latest.name == "step-000004"
    assert {p.name: p.read_bytes() for p in latest.iterdir()} == before


def test_sigterm_saves_and_exits_75(tmp_path):
    with pytest.raises(Interrupted) as e:
        run(tmp_path, loss=interrupt_during_step(3))
    assert e.value.exit_code == 75
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000003"


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    run(tmp_path, steps=4)
    ckpts = tmp_path / "checkpoints"
    # a save killed mid-way leaves a hidden temp dir; one killed between files leaves no state.json
    (ckpts / ".step-000008.tmp-123").mkdir()
    broken = ckpts / "step-000009"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(ckpts).name == "step-000004"
    checkpoint.prune(ckpts, keep=5)
    assert not (ckpts / ".step-000008.tmp-123").exists()


def test_changed_fingerprint_is_refused(tmp_path):
    run(tmp_path, steps=4)
    model = Toy()
    cfg = TrainConfig(steps=8, batch_size=4, seq_len=T, checkpoint_every=4)
    with pytest.raises(UsageError, match="cannot resume: model changed"):
        train(model, cfg=cfg, optim=OptimConfig(), batches=batches, loss_fn=loss_fn, out=tmp_path, log=print,
              fingerprint={"model": "other"})


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    run(tmp_path, steps=4)
    latest = checkpoint.latest(tmp_path / "checkpoints")
    assert sorted(p.name for p in latest.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 4 and state["extra"]["fingerprint"] == {"model": "toy"}


def test_sigkill_while_saving_never_leaves_a_resumable_checkpoint(tmp_path):
    import subprocess
    import sys
    import time

    run(tmp_path, steps=4)  # a complete step-000004
    child = (
        "import os, time, torch\n"
        "from mmctl.train import checkpoint\n"
        "model = torch.nn.Linear(4, 4)\n"
        "opt = torch.optim.AdamW(model.parameters())\n"
        "model(torch.ones(1, 4)).sum().backward(); opt.step()\n"
        "os.replace = lambda *a: time.sleep(60)  # every file written, the publishing rename not yet done\n"
        f"checkpoint.save({str(tmp_path / 'checkpoints')!r}, 8, model, opt, {{}})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.time() + 60
    while not list((tmp_path / "checkpoints").glob(".step-000008.tmp-*/state.json")):
        assert time.time() < deadline and proc.poll() is None, "the child never reached the rename"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000004"
    _, records = run(tmp_path, steps=6)  # resumes from step 4, not from the half-published step 8
    assert [r["step"] for r in records if "loss" in r] == [5, 6]
