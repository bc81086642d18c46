"""align-vision on a tiny LM and ViT: phases freeze what they do not train, the loss falls, the model exports as
a Llava dir transformers loads, a run interrupted in its second phase resumes to the same result."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from mmctl import recipe  # noqa: E402
from mmctl.errors import Interrupted, UsageError  # noqa: E402
from mmctl.objectives import Answer  # noqa: E402
from mmctl.stages import Job  # noqa: E402
from mmctl.stages import align_vision as stage  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def config(checkpoint, out, projector="mlp", **changes):
    phase = {"optim": {"lr": 3e-3, "warmup_steps": 0}, "val_fraction": 0.1}
    train = {"batch_size": 8, "seq_len": 63, "precision": "fp32", "log_every": 1, "eval_every": 3,
             "checkpoint_every": 2}
    data = {"run": {"out": str(out), "seed": 3, "device": "cpu"}, "base": str(checkpoint),
            "vision": {"encoder": {"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
                                   "num_layers": 2, "num_heads": 2},
                       "projector": {"kind": projector, "scale_factor": 2}},
            "phases": [{"name": "align", "sources": [{"kind": "shapes", "items": 60}],  # (captions overflow 64)
                        "trainable": {"multi_modal_projector": 1.0}, **phase, "train": {**train, "steps": 4}},
                       {"name": "instruct", "sources": [{"kind": "shapes", "items": 60}],
                        "trainable": {"multi_modal_projector": 1.0, "vision_tower": 1.0, "language_model": 0.3},
                        **phase, "train": {**train, "steps": 5}}],
            "eval": {"items": 12, "composition_items": 6}}
    for key, value in changes.items():
        data[key] = value
    return recipe.build(stage.AlignVisionRecipe, data, recipe.Source("r", {}, set()))


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tok_s", "mfu")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_phases_train_what_they_name_and_the_model_loads_in_transformers(checkpoint, tmp_path, monkeypatch):
    import transformers

    from mmctl import checkpoints

    lm_before = {k: v.clone() for k, v in checkpoints.load_lm(checkpoint).state_dict().items()}
    seen = {}
    real = Job.train

    def spy(job, parts, cfg, optim, precision, checkpoints, log):  # the weights each phase starts and ends with
        before = {k: v.clone() for k, v in parts.model.state_dict().items()}
        out = real(job, parts, cfg, optim, precision, checkpoints, log)
        seen[checkpoints.split("/")[1]] = (before, {k: v.clone() for k, v in parts.model.state_dict().items()})
        return out

    monkeypatch.setattr(Job, "train", spy)
    result = stage.run(config(checkpoint, tmp_path / "a"))
    before, after = seen["align"]
    for name in before:  # phase 1 trains the projector only
        changed = not torch.equal(before[name], after[name])
        assert changed == name.startswith("multi_modal_projector."), name
    for name, t in lm_before.items():
        assert torch.equal(after[f"language_model.{name}"], t)
    before, after = seen["instruct"]
    assert not torch.equal(before["vision_tower.embeddings.patch_embedding.weight"],
                           after["vision_tower.embeddings.patch_embedding.weight"])
    rows = metrics(tmp_path / "a")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
    assert [r["phase"] for r in rows if "loss" in r] == ["align"] * 4 + ["instruct"] * 5
    scores = result.results["evaluation"]
    assert set(scores["per_type"]) == {"count", "colour", "shape", "position", "relation", "exists"}
    assert 0 <= scores.get("hallucination_rate", 0) <= 1 and 0 <= scores["composition_accuracy"] <= 1
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "a" / "model")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert stage.run(config(checkpoint, tmp_path / "a")).up_to_date


def test_interrupted_in_the_second_phase_resumes_to_the_same_model(checkpoint, tmp_path, monkeypatch):
    stage.run(config(checkpoint, tmp_path / "full", "pixel_shuffle"))
    real, calls = Answer.loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 7:  # step 6 of 9 overall: the second phase's second step
            signal.raise_signal(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(Answer, "loss", staticmethod(interrupting))
    with pytest.raises(Interrupted):
        stage.run(config(checkpoint, tmp_path / "part", "pixel_shuffle"))
    monkeypatch.setattr(Answer, "loss", staticmethod(real))
    stage.run(config(checkpoint, tmp_path / "part", "pixel_shuffle"))
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")
    full = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "part" / "model" / "model.safetensors").read_bytes() == full
    from mmctl import checkpoints

    assert checkpoints.load_vlm(tmp_path / "full" / "model").vision.projector.kind == "pixel_shuffle"


def test_recipe_mistakes_are_named(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="trainable"):
        config(checkpoint, tmp_path, phases=[{"name": "x", "sources": [{"kind": "shapes", "items": 5}],
                                              "trainable": {"the_vit": 1.0}}])
    with pytest.raises(UsageError, match="seq_len"):
        cfg = config(checkpoint, tmp_path / "o")
        cfg.phases[0].train.seq_len = 8
        stage.run(cfg)


def test_a_contrastive_phase_trains_the_vit_against_a_text_tower(checkpoint, tmp_path):
    from mmctl import checkpoints
    from mmctl.models import vlm

    train = {"batch_size": 8, "seq_len": 63, "precision": "fp32", "log_every": 1, "eval_every": 3,
             "checkpoint_every": 3, "steps": 3}
    phases = [{"name": "siglip", "objective": "siglip", "sources": [{"kind": "shapes", "items": 40, "captions": True}],
               "trainable": {"vision_tower": 1.0}, "val_fraction": 0.2, "optim": {"lr": 1e-3, "warmup_steps": 0},
               "train": {**train, "seq_len": 127}},  # captions: no LM context to fit
              {"name": "instruct", "sources": [{"kind": "shapes", "items": 24}],
               "trainable": {"multi_modal_projector": 1.0}, "optim": {"lr": 1e-3, "warmup_steps": 0},
               "train": {**train, "steps": 2}}]
    cfg = config(checkpoint, tmp_path / "c", phases=phases)
    stage.run(cfg)
    rows = metrics(tmp_path / "c")
    retrieval = [r for r in rows if "val_r@1_image_to_text" in r]
    assert len(retrieval) == 1 and 0 <= retrieval[0]["val_r@1_text_to_image"] <= 1
    assert [r["phase"] for r in rows if "loss" in r] == ["siglip"] * 3 + ["instruct"] * 2
    torch.manual_seed(3)  # the stage seeds with run.seed just before making the VLM: the same initial weights
    fresh = vlm.VLM(cfg.vision, checkpoints.load_lm(checkpoint), 7)
    trained = checkpoints.load_vlm(tmp_path / "c" / "model")
    before, after = fresh.state_dict(), trained.state_dict()
    for name in after:  # the ViT moved in the siglip phase, the projector in instruct, the LM never
        assert torch.equal(before[name], after[name]) == name.startswith("language_model."), name
    assert stage.run(cfg).up_to_date
    with pytest.raises(UsageError, match="captions"):
        bad = config(checkpoint, tmp_path / "d", phases=[{**phases[0], "sources": [{"kind": "shapes", "items": 8}]}])
        stage.run(bad)
    with pytest.raises(UsageError, match="vision_tower only"):
        config(checkpoint, tmp_path / "e", phases=[{**phases[0], "trainable": {"language_model": 1.0}}])


def test_a_cells_phase_trains_the_vit_on_the_scenes_labels_and_the_probe_reads_it(checkpoint, tmp_path):
    """Stage 0 on the shapes' own labels: only the ViT moves, the heads' held-out accuracy is logged, and the
    linear probe on the final encoder is in the results."""
    from mmctl import checkpoints
    from mmctl.models import vlm

    train = {"batch_size": 16, "seq_len": 63, "precision": "fp32", "log_every": 1, "eval_every": 20,
             "checkpoint_every": 20}
    phases = [{"name": "encoder", "objective": "cells", "sources": [{"kind": "shapes", "items": 400}],
               "trainable": {"vision_tower": 1.0}, "val_fraction": 0.1, "optim": {"lr": 3e-3, "warmup_steps": 0},
               "train": {**train, "steps": 40}},
              {"name": "instruct", "sources": [{"kind": "shapes", "items": 24}],
               "trainable": {"multi_modal_projector": 1.0}, "optim": {"lr": 1e-3, "warmup_steps": 0},
               "train": {**train, "batch_size": 8, "steps": 2}}]
    vision = {"encoder": {"image_size": 24, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                          "num_layers": 2, "num_heads": 2}, "projector": {"kind": "mlp"}}
    cfg = config(checkpoint, tmp_path / "c", phases=phases, vision=vision)
    result = stage.run(cfg).results
    heads = [r for r in metrics(tmp_path / "c") if "val_cell_colour" in r]
    assert len(heads) == 2 and heads[1]["val_loss"] < heads[0]["val_loss"]
    assert heads[1]["val_cell_colour"] > heads[0]["val_cell_colour"]
    torch.manual_seed(3)
    fresh = vlm.VLM(cfg.vision, checkpoints.load_lm(checkpoint), 7)
    trained = checkpoints.load_vlm(tmp_path / "c" / "model")
    before, after = fresh.state_dict(), trained.state_dict()
    assert not any(name.startswith("language_model.") and not torch.equal(before[name], after[name])
                   for name in after)
    assert any(not torch.equal(before[name], after[name]) for name in after if name.startswith("vision_tower."))
    probed = result["evaluation"]["probe"]
    assert {"cell_colour", "cell_shape", "count"} <= set(probed) and all(0 <= probed[k] <= 1 for k in probed
                                                                         if k.startswith(("cell", "count")))
    with pytest.raises(UsageError, match="kind: shapes"):
        from PIL import Image
        Image.new("RGB", (24, 24), "red").save(tmp_path / "x.png")
        (tmp_path / "d.jsonl").write_text('{"image": "x.png", "question": "What?", "answer": "red"}\n' * 4)
        stage.run(config(checkpoint, tmp_path / "d", vision=vision,
                         phases=[{**phases[0], "sources": [{"kind": "jsonl", "path": str(tmp_path / "d.jsonl")}]}]))


def test_own_images_are_scored_on_their_held_out_share(checkpoint, tmp_path):
    """A recipe on the user's own images is evaluated on the held-out part of them, not on the built-in shapes."""
    from PIL import Image

    lines = []
    for i in range(40):
        colour = ("red", "blue")[i % 2]
        Image.new("RGB", (16, 16), (200, 20, 20) if colour == "red" else (20, 20, 200)).save(tmp_path / f"{i}.png")
        noise = Image.effect_noise((16, 16), 30 + i).convert("RGB")  # each image distinct: the split is by image
        Image.blend(Image.open(tmp_path / f"{i}.png"), noise, 0.1).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "What colour is it?", "answer": colour,
                                 "type": "colour-of-square"}))
    (tmp_path / "own.jsonl").write_text("\n".join(lines) + "\n")
    phase = {"name": "own", "sources": [{"kind": "jsonl", "path": str(tmp_path / "own.jsonl")}],
             "trainable": {"multi_modal_projector": 1.0}, "optim": {"lr": 3e-3, "warmup_steps": 0},
             "val_fraction": 0.25, "train": {"steps": 2, "batch_size": 8, "seq_len": 63, "precision": "fp32",
                                             "log_every": 1, "eval_every": 2, "checkpoint_every": 2}}
    result = stage.run(config(checkpoint, tmp_path / "out", phases=[phase]))
    scores = result.results["evaluation"]
    assert scores["data"] == "the held-out share of phase own's sources"
    assert list(scores["per_type"]) == ["colour-of-square"]
    assert 0 < scores["per_type"]["colour-of-square"]["n"] < 40 and scores["per_type"]["colour-of-square"]["chance"] \
        is None
    shapes_only = stage.run(config(checkpoint, tmp_path / "shapes", phases=[{**phase, "sources": [
        {"kind": "shapes", "items": 40}]}])).results["evaluation"]
    assert shapes_only["data"] == "shapes" and "count" in shapes_only["per_type"]
