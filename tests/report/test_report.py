"""`mmctl report` on a synthetic set of run dirs whose numbers are known: each figure's data, the stage table
(finished, running, unfinished, not run), the eval table in curriculum order, floors, and the files written."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
import yaml

from mmctl.report import build, floors, runs
from mmctl.report.figures import series
from tests.test_cli import mmctl

STAMPS = {"started": "2026-12-02T08:00:00Z", "finished": "2026-12-02T08:02:30Z"}


def run_dir(root: Path, name: str, stage: str, results: dict | None, metrics: list[dict], recipe: dict | None = None
            ) -> Path:
    """A stage's output dir as artifacts.Run leaves it: recipe.yaml and metrics.jsonl, then manifest.json when it
    finished (results None: it did not)."""
    d = root / name
    d.mkdir(parents=True)
    recipe = {"stage": stage, **(recipe or {})}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 9, "lo')  # cut short
    if results is not None:
        (d / "manifest.json").write_text(json.dumps({"stage": stage, "recipe": recipe, "results": results, **STAMPS}))
    return d


@pytest.fixture
def out(tmp_path):
    root = tmp_path / "out"
    run_dir(root, "pretrain", "pretrain",
            {"final": {"val_loss": 1.25, "val_bpb": 0.4},
             "throughput": {"measured_tok_s": 900.0, "tok_s_at_peak": 3000.0},
             "memory": {"predicted_peak_bytes": 100.0, "measured_peak_rss_bytes": 250.0}},
            [{"step": 10, "loss": 3.0, "lr": 1e-3, "grad_norm": 2.0, "tokens": 1000},
             {"step": 20, "loss": 2.0, "lr": 5e-4, "grad_norm": 1.0, "tokens": 2000},
             {"step": 20, "val_loss": 2.5}])
    run_dir(root, "sft", "sft", None, [{"step": 5, "loss": 4.0, "lr": 1e-4, "tokens": 100}])  # stopped
    run_dir(root, "rl-grpo", "rl", {"algorithm": "grpo", "final": {"val_accuracy": 0.2, "val_reward": 0.2}},
            [{"step": 1, "loss": 0.0, "reward": 0.1, "kl": 0.01, "completions/mean_length": 3.0, "tokens": 50},
             {"step": 2, "loss": 0.0, "reward": 0.3, "kl": 0.02, "completions/mean_length": 2.5, "tokens": 100}])
    run_dir(root, "align-vision", "align-vision",
            {"evaluation": {"per_type": {"count": {"accuracy": 0.5, "chance": 1 / 3}, "colour": {"accuracy": 0.7,
                                                                                                  "chance": 0.2}},
                            "accuracy": 0.6, "hallucination_rate": 0.1, "composition_accuracy": 0.4,
                            "question_only": {"accuracy": 0.3, "per_type": {"count": 0.34, "colour": 0.21}},
                            "probe": {"cell_colour": 1.0, "cell_shape": 0.97, "count": 0.99}}}, [])
    run_dir(root, "quantize", "quantize",
            {"rows": [{"name": "unquantized", "method": "none", "bytes": 4 * 2**20, "bits": 32, "perplexity": 2.0},
                      {"name": "rtn-8bit", "method": "rtn", "bytes": 2**20, "bits": 8.1, "perplexity": 2.02}]}, [])
    run_dir(root, "eval", "eval", {"checkpoints": {
        "out/quantize/rtn-8bit": {"tasks": {"arithmetic-mc": {"acc": 0.3, "acc_stderr": 0.05, "chance": 0.25}}},
        "out/rl-grpo/model": {"tasks": {"arithmetic": {"exact_match": 0.2, "exact_match_stderr": 0.01, "groups": {
            "+": {"exact_match": 0.3, "n": 5}, "*": {"exact_match": 0.1, "n": 5}}}}},
        "out/pretrain/model": {"tasks": {"arithmetic": {"exact_match": 0.05, "exact_match_stderr": 0.01},
                                         "stories-ppl": {"bits_per_byte": 0.19}}}}}, [])
    (root / "eval" / "samples.jsonl").write_text("{}\n")
    run_dir(root, "eval-rl", "eval", {"checkpoints": {  # the same items, with answers sampled too: pass@k joins the row
        "out/rl-grpo/model": {"tasks": {"arithmetic": {"exact_match": 0.21, "exact_match_stderr": 0.01, "pass@1": 0.15,
                                                       "pass@1_stderr": 0.02, "pass@2": 0.25, "pass@4": 0.35,
                                                       "maj@4": 0.2}}}}}, [])
    (root / "notes").mkdir()  # not a run dir: ignored
    return root


def test_every_figures_data_comes_from_the_logs(out):
    data = series(runs.find([out]))
    assert data["loss"]["pretrain"] == {"train": [(1000, 3.0), (2000, 2.0)], "val": [(2000, 2.5)]}
    assert data["loss"]["sft"] == {"train": [(100, 4.0)], "val": []}  # an unfinished run's log is drawn too
    assert data["optimizer"]["pretrain"] == {"lr": [(10, 1e-3), (20, 5e-4)], "grad_norm": [(10, 2.0), (20, 1.0)]}
    assert data["grpo"]["rl-grpo"] == {"reward": [(1, 0.1), (2, 0.3)], "kl": [(1, 0.01), (2, 0.02)],
                                       "completion_length": [(1, 3.0), (2, 2.5)]}
    assert "dpo" not in data
    assert data["vision"]["align-vision"] == {"count": (0.5, 1 / 3, 0.34), "colour": (0.7, 0.2, 0.21)}
    assert data["quantize"]["quantize"] == [("unquantized", 4 * 2**20, 2.0), ("rtn-8bit", 2**20, 2.02)]
    assert data["account"]["pretrain"] == {"tok_s": (3000.0, 900.0), "memory": (100.0, 250.0)}


def test_stages_are_shown_finished_unfinished_running_or_not_run(out):
    found = runs.find([out])
    assert [r.name for r in found] == ["pretrain", "sft", "rl-grpo", "align-vision", "quantize", "eval", "eval-rl"]
    data = build(found)
    by_run = {Path(s["run"]).name: s for s in data["stages"]}
    assert by_run["sft"]["status"] == "unfinished" and by_run["sft"]["headline"] == "stopped at step 5 (loss 4.000)"
    assert by_run["pretrain"]["seconds"] == 150 and by_run["pretrain"]["metrics"]["val_loss"] == 1.25
    assert by_run["rl-grpo"]["metrics"]["val_accuracy"] == 0.2
    assert by_run["quantize"]["metrics"] == {"rtn-8bit": pytest.approx(0.01)}
    assert data["not_run"] == ["account", "tokenize"]
    with open(out / "sft" / ".lock", "a") as lock:  # a live writer holds the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert runs.read(out / "sft").status == "running"
    assert runs.read(out / "sft").status == "unfinished"


def test_the_eval_table_runs_base_then_rl_then_quantized(out, monkeypatch):
    monkeypatch.chdir(out.parent)  # where the eval ran: its checkpoint paths are relative to here
    table = build(runs.find([out]), out.parent / "report")["eval"]
    assert [r["label"] for r in table["rows"]] == ["pretrain", "rl-grpo", "quantize/rtn-8bit"]
    assert [r["stage"] for r in table["rows"]] == ["pretrain", "rl", "quantize"]
    assert table["columns"] == ["arithmetic-mc", "arithmetic", "stories-ppl"]
    assert table["rows"][0]["cells"]["arithmetic"] == (0.05, 0.01, "exact_match")
    assert table["rows"][0]["samples"] == "../out/eval/samples.jsonl"
    assert table["rows"][1]["groups"] == {"arithmetic": {"+": 0.3, "*": 0.1}} and table["chance"] == {
        "arithmetic-mc": 0.25}
    assert table["rows"][1]["sampled"] == {"arithmetic": {"pass@1": 0.15, "pass@2": 0.25, "pass@4": 0.35}}
    assert table["rows"][0]["sampled"] == {}


def test_floors_pass_fail_and_name_what_is_missing(out, tmp_path):
    path = tmp_path / "floors.yaml"
    path.write_text(yaml.safe_dump([
        {"run": "pretrain", "value": "final.val_loss", "max": 2.0, "why": "learned"},
        {"run": "align-vision", "value": "evaluation.per_type.colour.accuracy", "min": 0.8},
        {"run": "sft", "value": "final.val_loss", "max": 3.0},
        {"run": "rl-dpo", "value": "final.val_loss", "max": 1.0},
        {"run": "eval", "value": "checkpoints[out/pretrain/model].tasks.arithmetic.exact_match", "min": 0.01},
        {"run": "quantize", "value": "rows.1.perplexity", "max": 2.1},
        {"run": "quantize", "value": "rows[rtn-8bit].perplexity", "max": 2.01},
        {"run": "pretrain", "value": "final", "min": 0}]))
    results = floors.check(floors.read(path), runs.find([out]))
    assert [r["ok"] for r in results] == [True, False, False, False, True, True, False, False]
    assert [r["problem"] for r in results[1:4]] == ["", "the run is unfinished", "no run dir of that name"]
    assert results[6]["found"] == 2.02 and results[7]["problem"] == "not a number (dict)"
    assert floors.describe(results[7]) == "pretrain final = not a number (dict), floor ≥ 0"
    assert floors.describe(results[1]) == "align-vision evaluation.per_type.colour.accuracy = 0.7, floor ≥ 0.8"


def test_the_command_writes_the_report_and_fails_on_a_missed_floor(out, tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("- {run: pretrain, value: final.val_loss, max: 2.0}\n")
    bad.write_text("- {run: pretrain, value: final.val_loss, max: 1.0, why: far under unigram}\n")
    result = mmctl("report", str(out), "--out", str(tmp_path / "r"), "--no-attention", "--floors", str(good),
                   "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["floors"][0]["ok"] and data["not_run"] == ["account", "tokenize"]
    written = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"report.md", "loss.png", "optimizer.png", "grpo.png", "vision.png", "quantize.png",
            "account.png"} <= written
    text = (tmp_path / "r" / "report.md").read_text()
    assert "| sft | " in text and "unfinished" in text and "| tokenize | | not run |" in text
    assert "![Training and validation loss against tokens](loss.png)" in text
    assert "| count | 0.50 | 0.34 | 0.33 |" in text and "cell shape 0.97, count 0.99" in text
    assert ("| checkpoint | stage | arithmetic-mc (chance 0.25) | arithmetic | arithmetic: * / + | "
            "arithmetic sampled: pass@1 / pass@4 | stories-ppl |") in text
    assert "| rl-grpo | rl |  | 0.200 ± 0.010 | 0.10 / 0.30 | 0.15 / 0.35 |  |" in text
    assert "| pretrain | pretrain |  | 0.050 ± 0.010 |  |  | 0.190 |" in text  # (none: empty cells)
    result = mmctl("report", str(out), "--out", str(tmp_path / "r2"), "--no-attention", "--floors", str(bad))
    assert result.returncode == 3
    assert "floor missed: pretrain final.val_loss = 1.25, floor ≤ 1.0 (far under unigram)" in result.stderr
    assert (tmp_path / "r2" / "report.md").is_file()  # written anyway, to look at


@pytest.mark.parametrize("contents, message", [(None, "not a directory"), ("empty", "no stage run here")])
def test_nothing_to_report_is_one_line(tmp_path, contents, message):
    target = tmp_path / "x"
    if contents:
        target.mkdir()
    result = mmctl("report", str(target), "--out", str(tmp_path / "r"), "--no-attention")
    assert result.returncode == 3 and message in result.stderr and "Traceback" not in result.stderr


def test_a_bad_floors_file_is_a_usage_error(out, tmp_path):
    path = tmp_path / "floors.yaml"
    path.write_text("- {run: pretrain, value: final.val_loss}\n")  # no bound
    result = mmctl("report", str(out), "--out", str(tmp_path / "r"), "--no-attention", "--floors", str(path))
    assert result.returncode == 2 and "check 1" in result.stderr


def test_attention_of_a_checkpoint_on_its_prompt(checkpoint):
    import torch

    from mmctl.report import attention

    maps = attention.language_model(checkpoint, "Once upon a time")
    w = maps["weights"]
    assert w.shape[:2] == (2, 4) and w.shape[2] == w.shape[3] == len(maps["tokens"])
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:3]))  # each query's weights are a distribution
    assert torch.triu(w, diagonal=1).abs().max() == 0  # and never look ahead


def test_an_unreadable_manifest_or_odd_values_are_shown_not_a_crash(out, tmp_path):
    (out / "quantize" / "manifest.json").write_text('{"stage": "quantize", "resu')  # cut short
    run_dir(out, "sft-nan", "sft", {"final": {"val_loss": float("nan")}, "rows": None, "checkpoints": None},
            [{"step": 1, "loss": float("nan"), "lr": 1e-3, "tokens": 10}, {"step": 2, "loss": 1.0, "tokens": 20}])
    result = mmctl("report", str(out), "--out", str(tmp_path / "r"), "--no-attention", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # strict JSON: NaN is null
    by_run = {Path(s["run"]).name: s for s in data["stages"]}
    assert by_run["quantize"]["status"] == "unreadable" and "not readable JSON" in by_run["quantize"]["headline"]
    assert by_run["sft-nan"]["metrics"]["val_loss"] is None
    assert data["figures"]["loss"]["sft-nan"]["train"] == [[20, 1.0]]  # the NaN point is left out
