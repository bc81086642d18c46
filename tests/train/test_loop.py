"""The training loop with a toy model: bit-exact resume, NaN stops before the step, signals save and exit 75,
a killed checkpoint write is never resumed, the same run twice logs the same numbers; the loss is normalised
once per step (accumulation equals one big batch even with uneven masks), metrics come from the loss, learning
rates scale per group, and frozen parameters stay out of the optimizer and the checkpoints."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from mmctl.errors import Interrupted, NonFiniteError, UsageError  # noqa: E402
from mmctl.runtime import Dist  # noqa: E402
from mmctl.train import checkpoint  # noqa: E402
from mmctl.train.loop import LossOut, Parts, Session, TrainConfig, train, train_step  # noqa: E402
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


def batches(step, rank):
    """Two micro-batches of 2 rows (batch_size 4, micro_batch_size 2)."""
    out = []
    for micro in range(2):
        g = torch.Generator().manual_seed(step * 1000 + micro * 10 + rank)
        out.append(torch.randint(0, V, (2, T + 1), generator=g))
    return out


def loss_fn(model, ids):
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(model(inputs).reshape(-1, V), targets.reshape(-1), reduction="sum")
    return LossOut(loss, targets.numel(), inputs.numel(), {"first_logit": (model(inputs)[:, 0, 0].sum(), 2)})


def fit(model, *, cfg, optim, batches, loss_fn, out, log, fingerprint, export=None, lr_scales=None,
        force_resume=False, dist=None):
    """`train` with its checkpoints in `out`/checkpoints, as a stage's Job sets it up."""
    parts = Parts(model, batches, loss_fn, export=export, fingerprint=fingerprint, lr_scales=lr_scales)
    return train(parts, cfg, optim, Session(out / "checkpoints", log, dist or Dist(), force_resume=force_resume))


def run(out, steps=12, log=None, loss=loss_fn, **train_kw):
    torch.set_num_threads(1)
    model = Toy()
    records = [] if log is None else log
    cfg = TrainConfig(steps=steps, batch_size=4, micro_batch_size=2, seq_len=T, log_every=1, checkpoint_every=4,
                      keep_checkpoints=2)
    fit(model, cfg=cfg, optim=OptimConfig(lr=1e-2, warmup_steps=2), batches=batches, loss_fn=loss,
          out=out, log=records.append, fingerprint={"model": "toy"}, **train_kw)
    return model, records


def losses(records):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in records if "loss" in r]


def interrupt_during_step(n):
    """A loss function that sends SIGTERM while step `n` runs (2 micro-batches per step)."""
    calls = []

    def loss(model, ids):
        calls.append(1)
        if len(calls) == 2 * n - 1:
            signal.raise_signal(signal.SIGTERM)
        return loss_fn(model, ids)

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

    def poisoned(model, ids):
        out = loss_fn(model, ids)
        out.sum = out.sum * float("nan")  # NaN from the resumed step on
        return out

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
        fit(model, cfg=cfg, optim=OptimConfig(), batches=batches, loss_fn=loss_fn, out=tmp_path, log=print,
              fingerprint={"model": "other"})


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    run(tmp_path, steps=4)
    latest = checkpoint.latest(tmp_path / "checkpoints")
    assert sorted(p.name for p in latest.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((latest / "state.json").read_text())
    assert state["step"] == 4 and state["extra"]["fingerprint"] == {"model": "toy"}


@pytest.mark.slow
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


def test_logs_real_tokens_and_the_loss_functions_metrics(tmp_path):
    _, records = run(tmp_path, steps=3)
    rows = [r for r in records if "loss" in r]
    assert [r["tokens"] for r in rows] == [32, 64, 96]  # 4 rows × 8 inputs per step
    assert all("first_logit" in r and "tok_s" in r for r in rows)


# --- one normalisation per step -------------------------------------------------------------------------------

def masked_rows(n_rows, seed):
    """Rows of ids with a mask of trained positions of random length (SFT's assistant-only loss)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n_rows, T + 1), generator=g)
    keep = torch.randint(1, T + 1, (n_rows,), generator=g)  # 1..T trained tokens per row
    mask = torch.arange(T)[None, :] < keep[:, None]
    return ids, mask


def masked_loss(model, batch):
    ids, mask = batch
    per_token = torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, V), ids[:, 1:].reshape(-1),
                                                  reduction="none").view(mask.shape)
    return LossOut((per_token * mask).sum(), int(mask.sum()), ids[:, :-1].numel())


def gradients_after_one_step(micro):
    torch.set_num_threads(1)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model, model, optimizer, micro, masked_loss, 0.0, "fp32", Dist(), 0)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def relative(a, b) -> float:
    """‖a − b‖ / ‖b‖: fp32 sums in another order differ in the last bits of the smallest elements."""
    return float((a - b).norm() / b.norm())


def test_accumulated_micro_batches_equal_one_batch_with_uneven_masks():
    ids, mask = masked_rows(16, seed=7)
    one = gradients_after_one_step([(ids, mask)])
    four = gradients_after_one_step([(ids[i:i + 4], mask[i:i + 4]) for i in range(0, 16, 4)])
    assert all(relative(four[name], one[name]) < 1e-6 for name in one)
    # the bug this prevents: averaging the four micro-batch means weighs a short-masked row's tokens more
    means = sum(gradients_after_one_step([(ids[i:i + 4], mask[i:i + 4])])["head.weight"] for i in range(0, 16, 4)) / 4
    assert relative(means, one["head.weight"]) > 1e-2


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    """2 gloo ranks × 2 micro-batches with uneven masks give the gradient of one process holding all 16 rows."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ddp_worker.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(launch + [str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    two = load_file(tmp_path / "grads-rank0.safetensors")
    ids, mask = masked_rows(16, seed=7)
    one = gradients_after_one_step([(ids, mask)])
    assert all(relative(two[name], one[name]) < 1e-6 for name in one)


# --- parameter groups, frozen parameters ----------------------------------------------------------------------

def test_learning_rate_scales_and_frozen_parameters():
    from mmctl.train.optim import make_optimizer

    model = Toy()
    model.norm.requires_grad_(False)
    opt = make_optimizer(model, OptimConfig(weight_decay=0.1), {"head.": 10.0})
    groups = [(g["lr_scale"], g["weight_decay"], sorted(id(p) for p in g["params"])) for g in opt.param_groups]
    assert groups == [(1.0, 0.1, [id(model.embed.weight)]), (10.0, 0.1, [id(model.head.weight)]),
                      (10.0, 0.0, [id(model.head.bias)])]


def test_frozen_parameters_are_fingerprinted_not_checkpointed(tmp_path):
    def frozen_norm():
        model = Toy()
        model.norm.requires_grad_(False)
        return model

    cfg = TrainConfig(steps=2, batch_size=4, micro_batch_size=2, seq_len=T, checkpoint_every=2)
    model = frozen_norm()
    fit(model, cfg=cfg, optim=OptimConfig(lr=1e-2, warmup_steps=1), batches=batches, loss_fn=loss_fn, out=tmp_path,
          log=lambda r: None, fingerprint={"model": "toy"})
    latest = checkpoint.latest(tmp_path / "checkpoints")
    from safetensors.torch import load_file

    assert sorted(load_file(latest / "model.safetensors")) == ["embed.weight", "head.bias", "head.weight"]
    assert "frozen" in json.loads((latest / "state.json").read_text())["extra"]["fingerprint"]
    other = frozen_norm()
    with torch.no_grad():
        other.norm.weight.mul_(2)  # another frozen base
    with pytest.raises(UsageError, match="cannot resume: frozen changed"):
        fit(other, cfg=TrainConfig(steps=4, batch_size=4, micro_batch_size=2, seq_len=T), optim=OptimConfig(),
              batches=batches, loss_fn=loss_fn, out=tmp_path, log=lambda r: None, fingerprint={"model": "toy"})


def test_an_export_makes_the_checkpoint_dir_carry_more_files(tmp_path):
    cfg = TrainConfig(steps=2, batch_size=4, micro_batch_size=2, seq_len=T, checkpoint_every=2)
    fit(Toy(), cfg=cfg, optim=OptimConfig(warmup_steps=1), batches=batches, loss_fn=loss_fn, out=tmp_path,
          log=lambda r: None, fingerprint={}, export=lambda d: (d / "config.json").write_text("{}"))
    assert (checkpoint.latest(tmp_path / "checkpoints") / "config.json").read_text() == "{}"


# --- corrupt checkpoints --------------------------------------------------------------------------------------

def corrupt_truncated(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def corrupt_garbage(path):
    (path / "optimizer.safetensors").write_bytes(b"\x00garbage" * 100)


def corrupt_step(path):  # a tampered state.json: the step does not match the directory
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "step": 39999}))


def corrupt_rng(path):
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "rng": {"python": "x"}}))


def corrupt_json(path):
    (path / "state.json").write_text('{"step": 8, ')


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_garbage, corrupt_step, corrupt_rng, corrupt_json])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, corrupt):
    full_model, full = run(tmp_path / "full")
    with pytest.raises(Interrupted):  # the same 12-step run, stopped after step 8: checkpoints at 4 and 8
        run(tmp_path / "part", loss=interrupt_during_step(8))
    corrupt(tmp_path / "part" / "checkpoints" / "step-000008")
    resumed_model, records = run(tmp_path / "part")  # warns, resumes from step 4, and ends where the full run did
    assert [r["step"] for r in records if "loss" in r] == list(range(5, 13))
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_no_resumable_checkpoint_left_is_refused(tmp_path):
    from mmctl.errors import DataError

    run(tmp_path, steps=4)
    corrupt_truncated(tmp_path / "checkpoints" / "step-000004")
    with pytest.raises(DataError, match="no checkpoint here can be resumed"):
        run(tmp_path)


def test_scale_prefixes_match_the_longest_and_must_match_something():
    from mmctl.train.optim import make_optimizer

    model = Toy()
    opt = make_optimizer(model, OptimConfig(), {"head": 2.0, "head.weight": 5.0})
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert (scale_of[id(model.head.weight)], scale_of[id(model.head.bias)]) == (5.0, 2.0)
    with pytest.raises(UsageError, match="projecter."):
        make_optimizer(model, OptimConfig(), {"projecter.": 10.0})


def test_moments_follow_their_parameter_when_the_groups_change(tmp_path):
    """Optimizer state is saved by parameter name: a resume with other learning-rate groups reorders nothing."""
    with pytest.raises(Interrupted):
        run(tmp_path, loss=interrupt_during_step(4))
    saved = checkpoint.latest(tmp_path / "checkpoints")
    model = Toy()
    from mmctl.train.optim import make_optimizer

    opt = make_optimizer(model, OptimConfig(), {"head.": 0.5})  # head first in no group order it had
    checkpoint.load(saved, model, opt)
    from safetensors.torch import load_file

    stored = load_file(saved / "optimizer.safetensors")
    by_id = {id(p): st for p, st in opt.state.items()}
    for name, p in model.named_parameters():
        assert torch.equal(by_id[id(p)]["exp_avg"], stored[f"state.{name}.exp_avg"]), name


def test_lora_training_resumes_bit_exactly_and_checkpoints_only_adapters(tmp_path):
    from mmctl.models import lora

    def lora_toy():
        model = Toy()
        lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=["head"]))
        return model

    def run_lora(out, loss=loss_fn):
        model = lora_toy()
        cfg = TrainConfig(steps=8, batch_size=4, micro_batch_size=2, seq_len=T, log_every=1, checkpoint_every=2)
        records = []
        fit(model, cfg=cfg, optim=OptimConfig(lr=1e-2, warmup_steps=1), batches=batches, loss_fn=loss, out=out,
              log=records.append, fingerprint={"model": "toy+lora"})
        return model, losses(records)

    full_model, full = run_lora(tmp_path / "full")
    with pytest.raises(Interrupted):
        run_lora(tmp_path / "part", loss=interrupt_during_step(5))
    first = [r for r in full if r[0] <= 5]
    resumed_model, second = run_lora(tmp_path / "part")
    assert first + second == full
    assert all(torch.equal(a, b) for a, b in zip(full_model.state_dict().values(),
                                                  resumed_model.state_dict().values(), strict=True))
    from safetensors.torch import load_file

    saved = load_file(checkpoint.latest(tmp_path / "part" / "checkpoints") / "model.safetensors")
    assert sorted(saved) == ["head.lora_A.weight", "head.lora_B.weight"]


def test_prune_to_zero_removes_every_checkpoint(tmp_path):
    """What --fresh does: no checkpoint is left to resume from."""
    run(tmp_path, steps=8)
    assert checkpoint.latest(tmp_path / "checkpoints") is not None
    checkpoint.prune(tmp_path / "checkpoints", keep=0)
    assert checkpoint.latest(tmp_path / "checkpoints") is None
