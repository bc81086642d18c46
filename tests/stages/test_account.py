"""The account stage: targets, recipe sections and cross-field rules, outputs."""

import json

import pytest

from mmctl import recipe
from mmctl.errors import DataError, UsageError
from mmctl.stages import account


def load(data: dict):
    return recipe.build(account.AccountRecipe, data, recipe.Source("r.yaml", {}, set()), stage="account")


def test_targets():
    assert account.load_config("recipes/tiny/account.yaml", []).model.hf["model_type"] == "llama"
    assert account.load_config("llama-7b", ["train.seq_len=512"]).model.preset == "llama-7b"
    assert account.load_config("llama-7b", ["train.seq_len=512"]).train.seq_len == 512
    assert account.load_config("ckpt/config.json", []).model.config == "ckpt/config.json"
    assert account.load_config("runs/pretrain/model", []).model.config == "runs/pretrain/model"
    tiny = account.load_config("recipes/tiny/pretrain.yaml", [])  # a training recipe: its model and run
    assert tiny.model.hf["hidden_size"] == 256 and tiny.train.seq_len == 256 and tiny.train.batch_size == 16


@pytest.mark.parametrize("data, fragment", [
    ({}, "model.preset: missing required value: set one of model.preset, model.config or model.hf"),
    ({"model": {"preset": "llama-7b", "hf": {"model_type": "llama"}}}, "model.hf: conflicts with model.preset"),
    ({"model": {"preset": "llama-7"}}, "model.preset: unknown preset 'llama-7'"),
    ({"model": {"preset": "gpt2"}, "train": {"zero": 2}}, "train.zero: ZeRO stage 2 shards over GPUs"),
    ({"model": {"preset": "gpt2"}, "hardware": {"gpu": "t4"}}, "train.precision: bf16-mixed needs bf16"),
    ({"model": {"preset": "gpt2"}, "train": {"zero": 4}}, "train.zero: 4 is out of range (must be ≤ 3)"),
])
def test_recipe_rules(data, fragment):
    with pytest.raises(UsageError) as e:
        load(data)
    assert any(fragment in p for p in e.value.problems), e.value.problems


def test_inline_config_errors_name_the_field():
    cfg = load({"model": {"hf": {"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}}})
    with pytest.raises(UsageError, match=r"model\.hf\.hidden_size: 100 is not divisible"):
        account.run(cfg)


def test_config_dir_is_an_input_with_its_hash(tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    cfg = load({"model": {"config": str(model)}, "run": {"out": str(tmp_path / "out")}})
    report = account.run(cfg)
    assert report.detail["arch"].name == "ckpt" and report.detail["arch"].num_layers == 2
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["inputs"]["model"]["path"].endswith("config.json")
    assert json.loads((tmp_path / "out" / "account.json").read_text())["params"]["total"] == \
        manifest["results"]["params.total"]
    assert account.run(cfg).up_to_date
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 3}))
    assert not account.run(cfg).up_to_date  # the input changed


def test_missing_config_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="config.json not found"):
        account.run(load({"model": {"config": str(tmp_path)}}))


def test_json_keys_are_stable():
    report = account.run(load({"model": {"preset": "mixtral-8x7b"}}))
    j = report.results
    assert set(j) == {"schema", "model", "workload", "params", "flops", "time", "memory", "scaling", "fit"}
    assert isinstance(j["params"]["total"], int) and isinstance(j["params"]["active"], int)
    assert j["params"]["active"] < j["params"]["total"]
    assert set(j["memory"]["training"]) == {"weights", "gradients", "master_weights", "optimizer", "activations",
                                            "logits", "peak", "sum_of_parts"}


def test_what_does_not_fit_says_what_would():
    """70B on one H100: over the GPU's memory, and the first remedy that fits is named (and fits)."""
    from mmctl.accounting import fit

    big = account.run(load({"model": {"preset": "llama-3.1-70b"}, "hardware": {"gpu": "h100-sxm"}})).results["fit"]
    assert not big["fits"] and big["peak_bytes"] > 80e9 and big["peak_with"] <= 80e9
    assert big["with"]["zero"] == 3 and big["with"]["num_gpus"] > 1
    small = account.run(load({"model": {"preset": "gpt2"}, "hardware": {"gpu": "h100-sxm"}})).results["fit"]
    assert small["fits"] and small["with"] is None
    assert fit  # (the same function `mmctl account` renders from)


def test_a_checkpoint_dir_reports_the_bytes_it_stores_and_how(checkpoint, tmp_path):
    """A dense checkpoint's weights on disk in its dtype; a quantized one's with its method (read, not predicted)."""
    from mmctl import checkpoints
    from mmctl.quant import linear
    from mmctl.stages import account as stage

    dense = stage.on_disk(checkpoint / "config.json")
    assert dense.label == "weights on disk (float32)"
    assert dense.value == sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    model = checkpoints.load_lm(checkpoint)
    config = linear.quantize_model(model, "rtn", 4, 32)
    out = checkpoints.save(model, tmp_path / "q", None, quantization=config)
    quantized = stage.on_disk(out / "config.json")
    assert quantized.label == "weights on disk (rtn 4-bit g32)" and quantized.value < dense.value / 2
    assert stage.on_disk(None) is None
