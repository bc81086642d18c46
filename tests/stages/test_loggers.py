"""`train.loggers`: TensorBoard's event files, read back with TensorBoard's own reader, hold what metrics.jsonl
holds — the same names, values and steps, through an interrupted and resumed run without a step twice — and the
recipe as hyper-parameters; W&B runs offline here and records the same recipe and metrics."""

from __future__ import annotations

import json

import pytest

from mmctl.stages import Options, pretrain
from tests.models import one_thread  # noqa: F401
from tests.stages.test_pretrain import config, shards  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def logged(out) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers as {name: [(step, value), …]}."""
    series: dict[str, list] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                series.setdefault(name, []).append((record["step"], value))
    return series


def events(out):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_what_metrics_jsonl_holds(shards, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    pretrain.run(config(shards, out, loggers=["tensorboard"]))
    acc = events(out)
    expected = logged(out)
    assert set(expected) >= {"loss", "lr", "grad_norm", "val_loss"}
    got = scalars(acc)
    assert set(got) == set(expected)
    for name, series in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in series]
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in series], rel=1e-6)  # stored as float32
    texts = acc.Tags()["tensors"]
    assert "recipe/text_summary" in texts and any(t.startswith("sample") for t in texts)  # the eval's samples
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info.hparams
    assert hparams["train.steps"].number_value == 8 and hparams["model.hidden_size"].number_value == 32
    assert hparams["train.loggers"].string_value == '["tensorboard"]'


def test_a_resumed_run_continues_the_same_tensorboard_run(shards, tmp_path, monkeypatch):  # noqa: F811
    from mmctl.train import loss

    real, calls = loss.linear_cross_entropy, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # a crash in step 8 of 8: step 7 was logged, the resumed run logs it again
            raise RuntimeError("crash")
        return real(*args, **kwargs)

    out = tmp_path / "part"
    monkeypatch.setattr(loss, "linear_cross_entropy", interrupting)
    with pytest.raises(RuntimeError):
        pretrain.run(config(shards, out, loggers=["tensorboard"]))
    monkeypatch.setattr(loss, "linear_cross_entropy", real)
    assert [s for s, _ in scalars(events(out))["loss"]] == list(range(1, 8))
    pretrain.run(config(shards, out, loggers=["tensorboard"]))  # resumes from step 6's checkpoint
    got, expected = scalars(events(out)), logged(out)
    assert [s for s, _ in got["loss"]] == [s for s, _ in expected["loss"]] == list(range(1, 9))  # each step once
    assert [v for _, v in got["loss"]] == pytest.approx([v for _, v in expected["loss"]], rel=1e-6)
    pretrain.run(config(shards, out, loggers=["tensorboard"], steps=4), Options(fresh=True))  # from step 0 again
    assert [s for s, _ in scalars(events(out))["loss"]] == [1, 2, 3, 4]


def test_wandb_runs_offline_with_the_recipe_and_metrics(shards, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login: offline
    out = tmp_path / "run"
    pretrain.run(config(shards, out, loggers=["wandb"]))
    run_id = (out / "wandb" / "mmctl-run-id").read_text().strip()
    [log] = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    # W&B's own records (protobuf; its reader is in its Go core): they name the recipe's values and the metrics.
    # Its service process writes them after finish() returns (and before the interpreter exits): on a loaded
    # machine the file can still hold only its header for a while.
    import time

    deadline = time.monotonic() + 120
    while b"grad_norm" not in (records := log.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"train.steps" in records and b"model.hidden_size" in records
    assert b"val_loss" in records and b"grad_norm" in records
    from mmctl.train.loggers import _wandb_mode

    assert _wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode() == "disabled"


def test_an_unknown_logger_is_a_recipe_error(shards, tmp_path):  # noqa: F811
    from mmctl.errors import MmctlError

    with pytest.raises(MmctlError, match="'tensorbord' is not one of tensorboard, wandb; did you mean `tensorboard`"):
        config(shards, tmp_path / "x", loggers=["tensorbord"])
