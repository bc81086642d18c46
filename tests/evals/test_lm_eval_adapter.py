"""The lm-eval adapter against mmctl's own evals: the harness on local tasks (lm_eval_task/) scores what `mmctl eval`
scores, item by item, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmctl.errors import UsageError
from mmctl.evals import generation, multiple_choice, perplexity
from mmctl.evals.tasks import GEN_FIELDS, MC_FIELDS, TaskConfig, read_jsonl

TASKS = Path(__file__).parent / "lm_eval_task"
DOCS = ["Once upon a time, there was a little cat named Tom. " * 8, "Question: What is 3 + 4?\nAnswer: 7", "A."]
MODULE = "mmctl.evals.lm_eval_adapter"


def offline_env(tmp_path) -> dict:
    # `datasets` caches what its json builder reads under HF_DATASETS_CACHE: keep that out of the home directory
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path / "datasets")}


@pytest.fixture(scope="module")
def adapter():
    pytest.importorskip("lm_eval")
    from mmctl.evals import lm_eval_adapter

    return lm_eval_adapter


@pytest.fixture(scope="module")
def mmctl_model(checkpoint):
    from mmctl import checkpoints
    from mmctl.tokenizer import bpe

    return checkpoints.load_lm(checkpoint), bpe.load(checkpoint)


@pytest.fixture(scope="module")
def harness(adapter, checkpoint, tmp_path_factory):
    """lm_eval.simple_evaluate(model="mmctl") on both local tasks, run once, with every sample logged."""
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(TASKS)  # the task YAMLs name their data files relative to the working directory
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        return lm_eval.simple_evaluate(
            model="mmctl", model_args=f"pretrained={checkpoint},batch_size=3",
            tasks=["mmctl_mc", "mmctl_gen"], task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # leave global RNGs


def by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


def test_multiple_choice_scores_equal_mmctl_eval(harness, mmctl_model):
    model, tok = mmctl_model
    items = read_jsonl(TASKS / "mc.jsonl", MC_FIELDS)
    task = TaskConfig(kind="multiple_choice", data=str(TASKS / "mc.jsonl"))
    metrics, samples = multiple_choice.evaluate(model, tok, task, items, batch_size=8, seed=0, stats={})
    ours = by_doc(harness["samples"]["mmctl_mc"])
    assert len(ours) == len(items)
    for theirs, mine in zip(ours, samples, strict=True):
        # lm-eval puts the target delimiter " " in the continuation, as mmctl does
        assert [r[0][0] for r in theirs["resps"]] == pytest.approx(mine["logprobs"], abs=1e-4)
    assert harness["results"]["mmctl_mc"]["acc,none"] == metrics["acc"]
    # lm-eval's acc_norm divides by the choice's length without the delimiter
    norm = [float(max(range(len(s["choices"])), key=lambda k: s["logprobs"][k] / len(s["choices"][k])) == s["target"])
            for s in samples]
    assert harness["results"]["mmctl_mc"]["acc_norm,none"] == pytest.approx(sum(norm) / len(norm))


def test_generation_completions_equal_mmctl_eval(harness, mmctl_model):
    model, tok = mmctl_model
    items = read_jsonl(TASKS / "gen.jsonl", GEN_FIELDS)
    task = TaskConfig(kind="generation", data=str(TASKS / "gen.jsonl"), max_new_tokens=8, stop=["\n"], extract="exact")
    metrics, samples = generation.evaluate(model, tok, task, items, batch_size=8, seed=0, stats={})
    ours = by_doc(harness["samples"]["mmctl_gen"])
    assert [s["filtered_resps"][0] for s in ours] == [s["completion"] for s in samples]
    assert harness["results"]["mmctl_gen"]["exact_match,none"] == metrics["exact_match"]


def test_rolling_loglikelihood_equals_mmctl_perplexity(adapter, checkpoint, mmctl_model):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tok = mmctl_model
    lm = adapter.MmctlLM(pretrained=str(checkpoint), batch_size=2)
    assert len(tok.encode(DOCS[0])) > 2 * lm.max_length  # several windows
    requests = [Instance("loglikelihood_rolling", {}, (doc,), i) for i, doc in enumerate(DOCS)]
    task = TaskConfig(kind="perplexity", data="x")
    _, samples = perplexity.evaluate(model, tok, task, DOCS, batch_size=3, seed=0, stats={})
    assert [-x for x in lm.loglikelihood_rolling(requests)] == pytest.approx([s["nats"] for s in samples], rel=1e-5)
    # mmctl's windows with stride = window are lm-eval's own (get_rolling_token_windows, context_len=1)
    for doc in DOCS:
        ids = tok.encode(doc)
        for window in (5, 24, 64):
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.eos_id, window, 1)]
            assert [tuple(r) for r in perplexity.rolling_requests(ids, tok.eos_id, window, window)] == theirs


def test_generate_until_cuts_at_the_first_stop_string_in_request_order(adapter, checkpoint, mmctl_model):
    from lm_eval.api.instance import Instance

    from mmctl.generate import SamplingConfig, generate

    model, tok = mmctl_model
    prompts = ["Tom said", "The frog", "Anna!", "Once upon a time, Tom said"]
    # alone and without stop strings, this random model repeats each prompt's last token
    alone = [tok.decode(generate(model, [tok.encode(p)], SamplingConfig(max_new_tokens=9)).completions[0].ids)
             for p in prompts]
    assert alone == [" said" * 9, "g" * 9, "!" * 9, " said" * 9]
    kwargs = [{"until": ["aid s", "!!!"], "max_gen_toks": 6}, {"until": "gg", "max_gen_toks": 9}]
    requests = [Instance("generate_until", {}, (p, kwargs[i % 2]), i) for i, p in enumerate(prompts)]
    lm = adapter.MmctlLM(pretrained=str(checkpoint), batch_size=2)
    assert lm.generate_until(requests) == [" s", "", "", " said" * 9]


def test_generation_kwargs_map_to_sampling(adapter, checkpoint):
    lm = adapter.MmctlLM(pretrained=str(checkpoint))
    sampling, until = lm.sampling({"until": "\n\n", "temperature": 0.7})
    assert (until, sampling.stop_strings, sampling.temperature, sampling.max_new_tokens) == (["\n\n"], ["\n\n"], 0, 63)
    sampling, until = lm.sampling({"until": ["Q:"], "do_sample": True, "temperature": 0.5, "top_p": 0.9,
                                   "max_gen_toks": 4})
    assert (until, sampling.temperature, sampling.top_p, sampling.max_new_tokens) == (["Q:"], 0.5, 0.9, 4)


def test_bad_model_args_are_usage_errors(adapter, checkpoint):
    with pytest.raises(UsageError, match="batch_size"):
        adapter.MmctlLM(pretrained=str(checkpoint), batch_size="auto")
    with pytest.raises(UsageError, match="max_length 65 must be in 2..64"):
        adapter.MmctlLM(pretrained=str(checkpoint), max_length="65")


def test_the_module_runs_the_harness_cli(harness, checkpoint, tmp_path):
    out = tmp_path / "out"
    # no --device: the harness passes cuda:0, which must fall back to the CPU here; batch_size in model_args must
    # not clash with the harness's own --batch_size
    args = ["--model", "mmctl", "--model_args", f"pretrained={checkpoint},batch_size=2",
            "--tasks", "mmctl_mc,mmctl_gen", "--include_path", str(TASKS), "--limit", "2", "--output_path", str(out)]
    run = subprocess.run([sys.executable, "-m", MODULE, *args], cwd=TASKS, env=offline_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mmctl_mc" in run.stdout and "acc_norm" in run.stdout
    (results,) = out.rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]
    for name, metric in [("mmctl_mc", "acc"), ("mmctl_mc", "acc_norm"), ("mmctl_gen", "exact_match")]:
        first_two = by_doc(harness["samples"][name])[:2]  # what the in-process run scored for them
        assert scores[name][f"{metric},none"] == sum(s[metric] for s in first_two) / 2


def test_without_lm_eval_the_module_names_the_extra_and_exits_2(tmp_path):
    hide = f"import runpy, sys; sys.modules['lm_eval'] = None; runpy.run_module({MODULE!r}, run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", hide], env=offline_env(tmp_path), capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: lm_eval is not installed; install the extra: "
                                               "pip install 'mmctl[eval]'"]
