"""A VLM checkpoint in the other commands: `mmctl eval --task shapes-vqa | vqa`, scored per question type with
chance, hallucination and composition; `mmctl generate --image`; and the errors a user meets on the way."""

from __future__ import annotations

import json

import pytest
import torch

from mmctl.data import shapes, vqa  # noqa: E402
from mmctl.evals import vqa as vqa_eval  # noqa: E402
from tests.test_cli import mmctl  # noqa: E402


def test_scores_per_type_hallucination_and_composition(monkeypatch):
    """The scoring, with the model's answers fixed: always the truth except "yes" to every exists question."""
    examples = vqa.shapes(60, 5, "train", 16)
    composition = vqa.shapes(6, 5, "test", 16)
    said = {id(e.pixels): "yes" if e.type == "exists" else e.answer for e in examples + composition}
    monkeypatch.setattr(vqa_eval, "answers", lambda model, tok, pixels, questions, batch_size: [
        f" {said[id(p)].upper()} " for p in pixels])  # case and spaces do not count
    model = torch.nn.Linear(1, 1)
    scores, samples = vqa_eval.evaluate(model, None, examples, composition)
    absent = [e for e in examples if e.type == "exists" and e.answer == "no"]
    assert absent and scores["hallucination_rate"] == 1.0
    assert scores["per_type"]["exists"]["accuracy"] == pytest.approx(1 - len(absent) / 10)
    for kind in ("count", "colour", "shape", "position", "relation"):
        assert scores["per_type"][kind] == {"accuracy": 1.0, "chance": shapes.CHANCE[kind], "n": 10}
    assert scores["accuracy"] == pytest.approx(1 - len(absent) / 60)
    assert scores["composition_accuracy"] == pytest.approx(
        sum(e.type != "exists" or e.answer == "yes" for e in composition) / 6)
    assert len(samples) == 66 and sum(s.get("composition", False) for s in samples) == 6
    # question-only: each question asked about the next example's image, so this model answers that one's truth
    blind = [said[id(examples[(i + 1) % 60].pixels)].lower() == e.answer.lower() for i, e in enumerate(examples)]
    assert scores["question_only"]["accuracy"] == pytest.approx(sum(blind) / 60) and sum(blind) < 30
    assert scores["question_only"]["per_type"]["count"] == pytest.approx(
        sum(b for b, e in zip(blind, examples, strict=True) if e.type == "count") / 10)
    flat = vqa_eval.metrics(scores)
    assert flat["count"] == 1.0 and flat["count_chance"] == pytest.approx(1 / 3) and "hallucination_rate" in flat


def test_eval_scores_a_vlm_on_shapes_and_on_a_jsonl_of_images(vlm_dir, tmp_path):
    from PIL import Image

    out = mmctl("eval", str(vlm_dir), "--task", "shapes-vqa", "--limit", "12", "--out", str(tmp_path / "e"),
                "--json")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)["checkpoints"][str(vlm_dir)]["tasks"]["shapes-vqa"]
    assert {"accuracy", "count", "count_chance", "composition_accuracy"} <= set(metrics)
    samples = [json.loads(line) for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and {"question", "answer", "prediction", "correct", "type"} <= set(samples[0])
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "red.png", "question": "Colour?", "answer": "red"}) + "\n")
    out = mmctl("eval", str(vlm_dir), "--task", "vqa", "--data", str(tmp_path / "q.jsonl"), "--out",
                str(tmp_path / "f"), "--json")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["checkpoints"][str(vlm_dir)]["tasks"]["q"]) == {"accuracy", "vqa", "throughput"}
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "bad.png", "question": "Colour?", "answer": "red"}) + "\n")
    out = mmctl("eval", str(vlm_dir), "--task", "vqa", "--data", str(tmp_path / "q.jsonl"), "--out",
                str(tmp_path / "g"))
    assert out.returncode == 3 and "bad.png" in out.stderr and "q.jsonl:1" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_language_model_is_refused_for_images_and_a_vlm_for_text_training(checkpoint, vlm_dir, tmp_path):
    out = mmctl("eval", str(checkpoint), "--task", "shapes-vqa", "--out", str(tmp_path / "e"))
    assert out.returncode == 2 and "not a vision-language model" in out.stderr, out.stderr
    (tmp_path / "cat.png").write_bytes(b"")
    out = mmctl("generate", str(checkpoint), "--image", str(tmp_path / "cat.png"), "-p", "What is it?")
    assert out.returncode == 2 and "--image" in out.stderr and "language model" in out.stderr, out.stderr
    from mmctl import checkpoints
    from mmctl.errors import DataError

    with pytest.raises(DataError, match="vision-language model"):
        checkpoints.load(vlm_dir)


def test_generate_answers_about_an_image_as_eval_does(vlm_dir, tmp_path):
    from mmctl import checkpoints
    from mmctl.data import images

    scene = [shapes.Shape("circle", "red", "large", 0, 0), shapes.Shape("square", "blue", "small", 2, 2)]
    shapes.render(scene, 16).save(tmp_path / "scene.png")
    out = mmctl("generate", str(vlm_dir), "--image", str(tmp_path / "scene.png"), "-p", "How many shapes are there?",
                "--max-new-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    said = json.loads(out.stdout)["completions"][0]["completion"].strip()
    model, tok = checkpoints.load(vlm_dir, vision=True)
    pixels = images.pixels(images.load(tmp_path / "scene.png"), 16)
    assert said == vqa_eval.answers(model, tok, [pixels], ["How many shapes are there?"])[0]
    for image, fragment in ((tmp_path / "none.png", "image not found"), (tmp_path, "not a regular file")):
        out = mmctl("generate", str(vlm_dir), "--image", str(image), "-p", "What is it?")
        assert out.returncode == 3 and fragment in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_the_reports_vlm_attention_is_a_share_of_each_answer_token_over_the_patch_grid(vlm_dir):
    from mmctl.report import attention

    examples = attention.vision_language_model(vlm_dir, examples=2)
    assert len(examples) == 2
    for ex in examples:
        assert ex["grid"].shape == (2, 4, 4)  # (layers, rows, cols): 16-px images, 4-px patches
        assert (ex["grid"] >= 0).all() and (ex["grid"].sum(dim=(1, 2)) <= 1 + 1e-5).all()
        assert ex["expected"] and isinstance(ex["answer"], str)
