"""`mmctl generate` from the command line: streaming, batches, JSON, chat, errors."""

import json

import pytest

from tests.cli import mmctl


def generate(*args):
    return mmctl("generate", *args)


def test_stream_json_and_batch(checkpoint, tmp_path):
    one = generate(str(checkpoint), "--prompt", "Once upon a time", "--max-new-tokens", "5")
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith("Once upon a time") and "time to first token" in one.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Tom"}\n{"prompt": "What is 2 + 2?"}\n')
    many = generate(str(checkpoint), "--prompts", str(prompts), "--max-new-tokens", "4", "--json")
    assert many.returncode == 0, many.stderr
    out = json.loads(many.stdout)
    assert [c["prompt"] for c in out["completions"]] == ["Tom", "What is 2 + 2?"]
    assert all(c["tokens"] <= 4 for c in out["completions"]) and out["time_to_first_token_s"] > 0
    # the batch decodes what each prompt decodes alone (greedy)
    alone = json.loads(generate(str(checkpoint), "-p", "Tom", "--max-new-tokens", "4", "--json").stdout)
    assert alone["completions"][0]["completion"] == out["completions"][0]["completion"]


def test_sampling_is_seeded_and_chat_works(checkpoint):
    args = [str(checkpoint), "-p", "Hello", "--max-new-tokens", "6", "--temperature", "1.0", "--top-p", "0.9",
            "--json"]
    a = json.loads(generate(*args, "--seed", "1").stdout)
    b = json.loads(generate(*args, "--seed", "1").stdout)
    assert a["completions"] == b["completions"]
    chat = generate(str(checkpoint), "-p", "Hi", "--chat", "--max-new-tokens", "3", "--json")
    assert chat.returncode == 0, chat.stderr
    assert json.loads(chat.stdout)["completions"][0]["prompt_tokens"] >= 3  # <|user|>Hi<|end|><|assistant|>


@pytest.mark.parametrize("args, code, fragment", [
    (["--max-new-tokens", "0"], 2, "sampling.max_new_tokens: 0 is out of range"),
    (["--top-p", "1.5"], 2, "sampling.top_p: 1.5 is out of range"),
    ([], 2, "prompts: missing required value"),
])
def test_errors(checkpoint, args, code, fragment):
    out = generate(str(checkpoint), *(["-p", "x"] if args else []), *args)
    assert out.returncode == code and fragment in out.stderr and "Traceback" not in out.stderr


def test_missing_checkpoint_is_exit_3(tmp_path):
    out = generate(str(tmp_path / "nope"), "-p", "x")
    assert out.returncode == 3 and "not a checkpoint directory (it does not exist)" in out.stderr


def test_non_ascii_prompts_survive_the_command_line(checkpoint):
    out = generate(str(checkpoint), "-p", "naïve 🙂 日本", "--max-new-tokens", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completions"][0]["prompt"] == "naïve 🙂 日本"


def test_a_draft_gives_the_same_completions_and_its_acceptance(checkpoint, tmp_path):
    args = [str(checkpoint), "-p", "Tom", "-p", "What is 2 + 2?", "--max-new-tokens", "12", "--json"]
    plain = json.loads(generate(*args).stdout)
    fast = generate(*args, "--draft", str(checkpoint), "--draft-tokens", "3")
    assert fast.returncode == 0, fast.stderr
    fast = json.loads(fast.stdout)
    assert fast["completions"] == plain["completions"]
    spec = fast["speculative"]
    assert spec["acceptance_rate"] == 1.0 and spec["tokens_per_target_forward"] > 1  # the draft is the target
    refused = generate(*args, "--draft", str(checkpoint), "--temperature", "0.7")
    assert refused.returncode == 2 and "greedy" in refused.stderr and "Traceback" not in refused.stderr
    (tmp_path / "other").mkdir()
    missing = generate(*args, "--draft", str(tmp_path / "other"))
    assert missing.returncode == 3 and "Traceback" not in missing.stderr


def test_compiled_decoding_gives_the_same_completions_and_reports_the_compile(checkpoint):
    args = [str(checkpoint), "-p", "Tom", "-p", "What is 2 + 2?", "--max-new-tokens", "8", "--json"]
    plain = json.loads(generate(*args).stdout)
    compiled = generate(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    compiled = json.loads(compiled.stdout)
    assert compiled["completions"] == plain["completions"] and compiled["compile_s"] > 0
    both = generate(*args, "--compile", "--draft", str(checkpoint))
    assert both.returncode == 2 and "do not combine" in both.stderr and "Traceback" not in both.stderr
