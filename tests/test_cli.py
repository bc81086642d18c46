"""The command line as a user meets it: exit codes, stdout vs stderr — in a real process where the process is what is
tested (imports, stdout apart from stderr), in this one elsewhere (tests/cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cli import invoke, mmctl


def test_version_and_help():
    out = mmctl("--version")
    assert out.returncode == 0 and out.stdout.strip().startswith("mmctl 0.")
    out = mmctl("--help")
    assert out.returncode == 0 and "account" in out.stdout and "validate" in out.stdout


def test_light_commands_do_not_import_torch():
    code = ("import sys\nfrom mmctl.cli import app\nsys.argv = ['mmctl', 'account', 'llama-7b', '--json']\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stderr.strip().endswith("[]"), out.stderr


@pytest.mark.parametrize(("command", "flag", "module", "cls", "path"), [
    ("generate", "--top-p", "mmctl.stages.generate", "GenerateConfig", "sampling.top_p"),
    ("account", "--num-gpus", "mmctl.stages.account", "AccountRecipe", "hardware.num_gpus"),
    ("eval", "--limit", "mmctl.stages.eval", "EvalRecipe", "eval.limit"),
    ("pretrain", "--device", "mmctl.runtime", "RunConfig", "device"),
])
def test_a_flags_help_is_its_recipe_fields_doc(command, flag, module, cls, path):
    """Flags that set a recipe field are made from the field: the help cannot drift from the recipe's doc."""
    import importlib

    from typer.testing import CliRunner

    from mmctl import recipe
    from mmctl.cli import app

    _, _, doc = recipe.field(getattr(importlib.import_module(module), cls), path)
    shown = CliRunner().invoke(app, [command, "--help"], terminal_width=1000).output
    line = next(line for line in shown.splitlines() if line.strip().startswith(flag))
    assert " ".join(doc.split()) in " ".join(line.split())


def test_account_json_on_stdout_only():
    out = mmctl("account", "llama-7b", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["params"]["total"] == 6_738_415_616
    assert report["params"]["active"] == 6_738_415_616
    assert report["schema"] == "mmctl.account/1"
    assert out.stderr == ""


def test_account_tables_go_to_stderr():
    out = mmctl("account", "qwen2.5-0.5b", "--explain")
    assert out.returncode == 0 and out.stdout == ""
    assert "494,032,768" in out.stderr and "Korthikanti" in out.stderr


@pytest.mark.parametrize("args, code, fragment", [
    (["account", "llama-8b"], 2, "'llama-8b' is not a model preset"),
    (["account", "llama-7"], 2, "did you mean `llama-7b`?"),
    (["account", "llama-7b", "--gpu", "h100"], 2, "--gpu: hardware.gpu: unknown GPU 'h100'; did you mean `h100-sxm`?"),
    (["account", "llama-7b", "--mfu", "2"], 2, "hardware.mfu: 2.0 is out of range (must be ≤ 1)"),
    (["account", "llama-7b", "--zero", "3"], 2, "train.zero: ZeRO stage 3 shards over GPUs"),
    (["account", "llama-7b", "--gpu", "h10"], 2, "unknown GPU 'h10'"),
    (["account", "llama-7b", "--gpu", "v100"], 2, "train.precision: bf16-mixed needs bf16"),
    (["account", "llama-7b", "--precision", "bf16"], 2, "'bf16' is not one of fp32, bf16-mixed"),
    (["account", "llama-7b", "--set", "train.seqlen=5"], 2, "train.seqlen: unknown key; did you mean `seq_len`?"),
    (["account", "missing/config.json"], 3, "config.json not found"),
    (["account", "nope.yaml"], 2, "nope.yaml: recipe not found"),
    (["account"], 2, "give a preset name"),
    (["validate", "nope.yaml"], 2, "recipe not found"),
])
def test_errors_are_one_line_with_exit_codes(args, code, fragment):
    out = invoke(*args)
    assert out.returncode == code, out.stderr
    assert fragment in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_corrupt_config_json_is_a_data_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    out = invoke("account", str(tmp_path))
    assert out.returncode == 3 and "not a readable JSON file" in out.stderr


def test_validate_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: account\nmodel:\n  preset: llama-7b\ntrain:\n  seq_len: 0\n  precison: fp32\n"
                   "hardware:\n  mfu: -1\n")
    out = invoke("validate", str(bad))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert f"{bad}:5: train.seq_len: 0 is out of range" in lines[0] or any(f"{bad}:5:" in x for x in lines)
    assert any("train.precison: unknown key; did you mean `precision`?" in x for x in lines)
    assert any(f"{bad}:8: hardware.mfu" in x for x in lines)
    good = invoke("validate", "recipes/tiny/account.yaml")
    assert good.returncode == 0 and "valid `mmctl account` recipe" in good.stderr


def test_up_to_date_and_force(tmp_path):
    recipe = tmp_path / "a.yaml"
    recipe.write_text(f"stage: account\nrun:\n  out: {tmp_path / 'out'}\nmodel:\n  preset: smollm2-135m\n")
    first = invoke("account", str(recipe))
    assert first.returncode == 0 and "wrote" in first.stderr
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert json.loads(manifest)["results"]["params.total"] == 134_515_008
    again = invoke("account", str(recipe))
    assert again.returncode == 0 and "up to date" in again.stderr
    assert (tmp_path / "out" / "manifest.json").read_text() == manifest
    forced = invoke("account", str(recipe), "--force")
    assert "wrote" in forced.stderr
    changed = invoke("account", str(recipe), "--seq-len", "4096")
    assert "wrote" in changed.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["recipe"]["train"]["seq_len"] == 4096


def test_dry_run_prints_the_resolved_recipe():
    out = invoke("account", "recipes/tiny/account.yaml", "--set", "train.seq_len=128", "--dry-run")
    assert out.returncode == 0
    assert "stage: account" in out.stdout and "seq_len: 128" in out.stdout and "mfu: 0.25" in out.stdout


def test_verify_agrees_on_a_config_dir(tmp_path):
    config = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = invoke("account", str(tmp_path), "--verify", "--json", "--seq-len", "16")
    assert out.returncode == 0, out.stderr
    checks = json.loads(out.stdout)["verify"]
    assert [c["ok"] for c in checks] == [True, True, True]


def test_list_presets():
    out = invoke("account", "--list")
    assert out.returncode == 0 and "deepseek-v3" in out.stderr and "h100-sxm" in out.stderr


def test_account_of_a_pretrain_recipe_and_a_checkpoint(checkpoint):
    out = invoke("account", "recipes/tiny/pretrain.yaml", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["params"]["total"] == 4_000_000
    assert report["workload"]["seq_len"] == 256 and report["workload"]["batch_size"] == 16
    assert report["flops"]["tokens"] == 150 * 16 * 256
    ckpt = json.loads(invoke("account", str(checkpoint), "--json").stdout)
    from mmctl import checkpoints

    assert ckpt["params"]["total"] == sum(p.numel() for p in checkpoints.load_lm(checkpoint).parameters())


def test_device_flag(checkpoint):
    out = invoke("generate", str(checkpoint), "-p", "Once", "--max-new-tokens", "2", "--device", "cpu", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["completions"][0]["tokens"] > 0, out.stderr
    bad = invoke("eval", str(checkpoint), "--task", "stories-mc", "--device", "tpu")
    assert bad.returncode == 2 and "run.device" in bad.stderr and "Traceback" not in bad.stderr


def test_errors_that_say_what_to_do(tmp_path, checkpoint):
    """Each met by a newcomer: the error names what was given and what to do instead."""
    import shutil

    shutil.copytree(checkpoint, tmp_path / "run" / "model")
    cases = [
        (["generate", str(tmp_path / "run"), "-p", "x"], 3, f"a run directory; its model is {tmp_path}/run/model"),
        (["generate", "HuggingFaceTB/SmolLM2-135M", "-p", "x"], 3, "hf download HuggingFaceTB/SmolLM2-135M"),
        (["eval", str(checkpoint)], 2, "--task NAME"),
        (["eval", str(checkpoint), "--task", "arithmatic"], 2, "did you mean `arithmetic`?"),
    ]
    for args, code, fragment in cases:
        out = invoke(*args)
        assert out.returncode == code and fragment in out.stderr, (args, out.stderr)


def test_an_evaluation_from_the_command_line_never_replaces_another_silently(tmp_path, checkpoint):
    first = invoke("eval", str(checkpoint), "--task", "stories-ppl", "--limit", "2", "--out", str(tmp_path / "e"))
    assert first.returncode == 0, first.stderr
    other = invoke("eval", str(checkpoint), "--task", "arithmetic", "--limit", "2", "--out", str(tmp_path / "e"))
    assert other.returncode == 2 and "--force replaces it" in other.stderr
    assert "stories-ppl" in (tmp_path / "e" / "results.json").read_text()
    forced = invoke("eval", str(checkpoint), "--task", "arithmetic", "--limit", "2", "--out", str(tmp_path / "e"),
                    "--force")
    assert forced.returncode == 0 and "arithmetic" in (tmp_path / "e" / "results.json").read_text()


def test_a_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    recipe = tmp_path / "t.yaml"
    recipe.write_text(f"stage: tokenize\nrun: {{out: {tmp_path / 'o'}}}\ndata:\n  sources: [{{kind: datasets, "
                      "path: 'hf:roneneldan/TinyStories'}]\n")
    out = invoke("tokenize", str(recipe))
    assert out.returncode == 3 and "offline mode is set" in out.stderr
