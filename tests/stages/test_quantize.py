"""`mmctl quantize` on a small trained model: a row per method beside the unquantized model, each method's
checkpoint on disk measuring what its row says, GPTQ calibrated on the shards, mistakes named."""

from __future__ import annotations

import json

import pytest

from mmctl import recipe  # noqa: E402
from mmctl.errors import UsageError  # noqa: E402
from mmctl.stages import pretrain, quantize  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401
from tests.stages.test_pretrain import config as pretrain_config  # noqa: E402
from tests.stages.test_pretrain import shards  # noqa: E402,F401
from tests.test_cli import mmctl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(shards, tmp_path_factory):  # noqa: F811
    return pretrain.run(pretrain_config(shards, tmp_path_factory.mktemp("q") / "pretrain")).out / "model"


def config(base, shards, out, **changes):  # noqa: F811
    data = {"run": {"out": str(out), "device": "cpu"}, "base": str(base),
            "methods": [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4, "group": 16},
                        {"method": "gptq", "bits": 4, "group": 16, "act_order": True}, {"method": "nf4"},
                        {"method": "int8-bnb"}],
            "calibration": {"data": str(shards / "shards"), "sequences": 8, "seq_len": 32},
            "evaluation": {"tokens": 300, "decode_tokens": 4,
                           "tasks": [{"builtin": "arithmetic-mc", "items": 8}]}, **changes}
    return recipe.build(quantize.QuantizeRecipe, data, recipe.Source("r", {}, set()))


def test_a_row_per_method_and_each_checkpoint_is_what_its_row_measured(base, shards, tmp_path):  # noqa: F811
    result = quantize.run(config(base, shards, tmp_path / "q"))
    rows = {r["name"]: r for r in result.results["rows"]}
    assert list(rows) == ["unquantized", "rtn-8bit", "rtn-4bit-g16", "gptq-4bit-g16-act", "nf4", "int8-bnb"]
    assert rows["nf4"]["bits"] > 4 and rows["nf4"]["bytes"] < rows["unquantized"]["bytes"]  # (a code table per layer)
    assert 8 < rows["int8-bnb"]["bits"] < 9 and abs(rows["int8-bnb"]["perplexity"] / rows["unquantized"]["perplexity"]
                                                    - 1) < 0.01
    assert rows["unquantized"]["bits"] == 32 and 8 < rows["rtn-8bit"]["bits"] < 9  # + a float32 scale per row
    assert rows["rtn-4bit-g16"]["bytes"] < rows["rtn-8bit"]["bytes"] < rows["unquantized"]["bytes"]
    assert abs(rows["rtn-8bit"]["perplexity"] / rows["unquantized"]["perplexity"] - 1) < 0.01
    assert {"acc", "acc_norm"} <= set(rows["rtn-8bit"]["tasks"]["arithmetic-mc"])
    out = mmctl("eval", str(tmp_path / "q" / "gptq-4bit-g16-act"), "--task", "ppl", "--data", str(shards / "shards"),
                "--set", "tasks[0].split=val", "--out", str(tmp_path / "e"), "--json")
    assert out.returncode == 0, out.stderr
    config_json = json.loads((tmp_path / "q" / "gptq-4bit-g16-act" / "config.json").read_text())
    assert config_json["quantization_config"]["desc_act"] is True
    for name in ("nf4", "int8-bnb"):
        out = mmctl("generate", str(tmp_path / "q" / name), "-p", "Once", "--max-new-tokens", "3", "--json")
        assert out.returncode == 0 and json.loads(out.stdout)["completions"][0]["tokens"] == 3, out.stderr
    assert quantize.run(config(base, shards, tmp_path / "q")).up_to_date


def test_mistakes_are_named(base, shards, tmp_path):  # noqa: F811
    with pytest.raises(UsageError, match="calibration.data"):
        config(base, shards, tmp_path / "a", calibration={})
    with pytest.raises(UsageError, match="gptq quantizes to 2, 3 or 4 bits"):
        config(base, shards, tmp_path / "a", methods=[{"method": "gptq", "bits": 8}])
    with pytest.raises(UsageError, match="share a name"):
        config(base, shards, tmp_path / "a", methods=[{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 8}])
    with pytest.raises(UsageError, match="group 48 does not divide"):
        quantize.run(config(base, shards, tmp_path / "b", methods=[{"method": "rtn", "bits": 4, "group": 48}]))


def test_a_quantized_base_is_refused_for_training_and_quantizing(base, shards, tmp_path):  # noqa: F811
    quantize.run(config(base, shards, tmp_path / "q", methods=[{"method": "rtn", "bits": 8}]))
    with pytest.raises(UsageError, match="quantized already"):
        quantize.run(config(tmp_path / "q" / "rtn-8bit", shards, tmp_path / "again"))
    from mmctl import checkpoints
    from mmctl.errors import DataError

    with pytest.raises(DataError, match="a quantized checkpoint"):
        checkpoints.load(tmp_path / "q" / "rtn-8bit")
    with pytest.raises(UsageError, match="vqa task"):
        config(base, shards, tmp_path / "v", evaluation={"tasks": [{"builtin": "shapes-vqa"}]})


def test_a_tokenize_output_is_accepted_and_evaluation_data_is_optional(base, shards, tmp_path):  # noqa: F811
    """The dir pretrain takes is the dir quantize takes; with no data at all, rtn runs (no perplexity column)."""
    cfg = config(base, shards, tmp_path / "a", methods=[{"method": "rtn", "bits": 8}])
    cfg.calibration.data = str(shards)  # the tokenize output, not its shards/
    rows = quantize.run(cfg).results["rows"]
    assert all(r["perplexity"] > 1 for r in rows)
    cfg = config(base, shards, tmp_path / "b", methods=[{"method": "rtn", "bits": 8}])
    cfg.calibration.data = None
    rows = quantize.run(cfg).results["rows"]
    assert [r["perplexity"] for r in rows] == [None, None] and rows[1]["bytes"] > 0
