"""Hostile inputs of the newer stages (tests/hostile/inputs.py): each case's files are made in a directory of its
own, then its command runs in a worker process with an address-space limit and a per-case time limit. The
expected exit code; `error:` lines only, the first naming the input; no traceback, no hang, no runaway memory,
and no code run that the recipe did not opt into."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hostile.inputs import DIR, FIFO, Link, cases

ROOT = Path(__file__).resolve().parents[2]
CASES = cases()


@pytest.fixture(scope="module")
def sources(checkpoint, tmp_path_factory):
    """The good inputs the cases damage copies of."""
    import datasets

    from mmctl import checkpoints
    from mmctl.models import vlm
    from mmctl.models.projector import ProjectorConfig
    from mmctl.models.vit import ViTConfig
    from mmctl.quant import MethodConfig, quantize
    from mmctl.tokenizer.bpe import IMAGE
    from tests.hostile.inputs import png

    root = tmp_path_factory.mktemp("hostile-inputs-sources")
    lm, tok = checkpoints.load(checkpoint)
    torch.manual_seed(0)
    section = vlm.VisionSection(encoder=ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                                  num_layers=1, num_heads=2), projector=ProjectorConfig("mlp"))
    out = {"base": str(checkpoint), "vlm": str(checkpoints.save_vlm(vlm.VLM(section, lm, tok.token_id(IMAGE)),
                                                                      root / "vlm", tok))}
    for name, method in {"quant": MethodConfig("rtn", bits=4, group=32), "nf4": MethodConfig("nf4"),
                         "int8": MethodConfig("int8-bnb")}.items():
        model = checkpoints.load_lm(checkpoint)
        config = quantize(model, method, ("lm_head",))
        out[name] = str(checkpoints.save(model, root / name, tok, quantization=config))
    other = root / "other-tokenizer"
    shutil.copytree(checkpoint, other)
    config = json.loads((other / "tokenizer.json").read_text())
    config["model"]["vocab"] = {f"{k}x" if len(k) > 3 else k: v for k, v in config["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(config))
    out["other-tokenizer"] = str(other)
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(8)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats)}).save_to_disk(root / "ds")
    out["ds"] = str(root / "ds")
    rows = {"question": ["What?"], "answer": ["red"]}
    datasets.Dataset.from_dict({"image": [{"bytes": "abc", "path": None}], **rows}).save_to_disk(root / "img-str")
    out["image-bytes-str"] = str(root / "img-str")
    bomb = datasets.Dataset.from_dict({"image": [{"bytes": png(30000, 30000), "path": None}], **rows},
                                      features=datasets.Features({"image": datasets.Image(), "question":
                                                                  datasets.Value("string"),
                                                                  "answer": datasets.Value("string")}))
    bomb.save_to_disk(root / "img-bomb")
    out["image-bomb"] = str(root / "img-bomb")
    runs = root / "runs" / "pretrain"
    runs.mkdir(parents=True)
    (runs / "recipe.yaml").write_text("stage: pretrain\n")
    out["runs"] = str(root / "runs")
    return out


def fill(text: str, d: Path, sources: dict) -> str:
    for key in ("base", "vlm", "quant", "nf4", "int8", "runs"):
        text = text.replace("{" + key + "}", sources[key])
    return text.replace("{d}", str(d))


def materialize(case, d: Path, sources: dict) -> None:
    from safetensors.torch import load_file, save_file

    d.mkdir()
    copies = {"<copy>": "ds", "<image-bytes-str>": "image-bytes-str", "<image-bomb>": "image-bomb"}
    for path, content in case.files.items():
        if path in ("<edit>", "<tensor>"):
            continue
        target = d / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            (shutil.rmtree if target.is_dir() else os.remove)(target)
        elif content == FIFO:
            os.mkfifo(target)
        elif content == DIR:
            target.mkdir()
        elif isinstance(content, Link):
            if target.exists():
                target.unlink()
            target.symlink_to(fill(content.target, d, sources))
        elif isinstance(content, str) and (content in copies or content.startswith("<copy:")):
            shutil.copytree(sources[copies.get(content) or content[6:-1]], target)
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(fill(content, d, sources), encoding="utf-8", errors="surrogatepass")
    if "<edit>" in case.files:
        name, changes = case.files["<edit>"]
        config_path = d / "ckpt" / name
        config = json.loads(config_path.read_text())
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            elif value is None:
                config.pop(key, None)
            else:
                config[key] = value
        config_path.write_text(json.dumps(config))
    if "<tensor>" in case.files:
        tensor, shape = case.files["<tensor>"]
        file = d / "ckpt" / "model.safetensors"
        tensors = load_file(file)
        tensors[tensor] = torch.zeros(shape, dtype=tensors[tensor].dtype)
        save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def results(sources, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-inputs")
    jobs = []
    for i, case in enumerate(CASES):
        d = tmp / f"case{i:03d}"
        materialize(case, d, sources)
        jobs.append({"name": case.name, "argv": [fill(a, d, sources) for a in case.argv], "cwd": str(d)})
    (tmp / "cases.json").write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-m", "tests.hostile.worker", str(tmp / "cases.json"),
                           str(tmp / "results.json")], cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    if os.environ.get("MMCTL_HOSTILE_RESULTS"):  # a copy to read while fixing what the cases found
        shutil.copy(tmp / "results.json", os.environ["MMCTL_HOSTILE_RESULTS"])
    return {r["name"]: r for r in json.loads((tmp / "results.json").read_text())}


def test_the_corpus_is_large():
    assert len(CASES) >= 150


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_input(results, case):
    r = results[case.name]
    assert r["traceback"] is None, r["traceback"]
    assert r["code"] == case.code, r["stderr"]
    if case.code:  # (a stage prints progress first: the errors are its last lines, and nothing follows them)
        errors = [line for line in r["stderr"] if line.startswith("error: ")]
        assert errors and r["stderr"][-len(errors):] == errors, r["stderr"]
        assert case.names in errors[0], r["stderr"]
