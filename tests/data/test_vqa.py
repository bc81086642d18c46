"""VLM rows: the placeholder expands to the image's tokens, the loss is on the answer (or also the question),
never on an image slot; JSONL examples with images beside the file, and bad ones named with their line."""

from __future__ import annotations

import json

import pytest

from mmctl.data import shapes, vqa  # noqa: E402
from mmctl.errors import DataError  # noqa: E402
from mmctl.tokenizer import bpe  # noqa: E402


def test_rows_expand_the_image_and_train_the_answer(checkpoint):
    tok = bpe.load(checkpoint)
    image = tok.token_id(bpe.IMAGE)
    [example] = vqa.shapes(1, 0, "train", 16)
    ids, mask = vqa.encode(example, tok, image, 9)
    assert ids.count(image) == 9 and len(ids) == len(mask)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained) == example.answer + "<|end|>"
    assert not any(m for t, m in zip(ids, mask, strict=True) if t == image)
    ids2, mask2 = vqa.encode(example, tok, image, 9, train_on_question=True)
    assert ids2 == ids and sum(mask2) > sum(mask) and not any(m for t, m in zip(ids2, mask2, strict=True)
                                                               if t == image)
    asked = vqa.prompt(example.question, tok, image, 9)
    assert ids[: len(asked)] == asked  # the row starts with exactly what generation asks


def test_several_questions_about_one_image_train_every_answer(checkpoint):
    """`questions: 6`: one conversation per scene, questions of different types, each answer (and its end of turn)
    trained, the image once; the scene's answers are the generator's."""
    tok = bpe.load(checkpoint)
    image = tok.token_id(bpe.IMAGE)
    examples = vqa.shapes(12, 0, "train", 16, questions=6)
    for example in examples:
        turns = [(example.question, example.answer), *example.more]
        assert 1 <= len(turns) <= 6 and len({q for q, _ in turns}) == len(turns)
        ids, mask = vqa.encode(example, tok, image, 9)
        assert ids.count(image) == 9
        trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert trained == "".join(f"{answer}<|end|>" for _, answer in turns)
    assert max(len(e.more) for e in examples) == 5  # six questions where the scene allows every type


def test_jsonl_examples_and_their_errors(tmp_path):
    import random

    shapes.render(shapes.scene(random.Random(0), "train"), 40).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "How many shapes are there?", "answer": 2, "type": "count"},
             {"image": "a.png", "caption": "a red circle"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    first, second = vqa.read_jsonl(path, 16)
    assert (first.answer, first.type, second.question, second.type) == ("2", "count", vqa.CAPTION_PROMPT, "caption")
    assert tuple(first.pixels.shape) == (3, 16, 16)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    for line, message in (({"image": "bad.png", "caption": "x"}, "d.jsonl:1: .*bad.png: not a readable image"),
                          ({"image": "gone.png", "caption": "x"}, "gone.png: image not found"),
                          ({"question": "q", "answer": "a"}, "missing field 'image'")):
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(DataError, match=message):
            vqa.read_jsonl(path, 16)


def test_a_datasets_dir_of_captions_and_vqa_questions(tmp_path):
    """COCO-style captions (a list: the first) and VQAv2-style answers (the most common) from a save_to_disk dir
    with decoded images; a row whose image bytes are broken is named."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    rows = {"image": [red, blue], "captions": [["a red square", "red"], ["a blue square"]]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "coco"))
    got = vqa.read_dataset(str(tmp_path / "coco"), "train", 4)
    assert [(e.question, e.answer, e.type) for e in got] == [(vqa.CAPTION_PROMPT, "a red square", "caption"),
                                                             (vqa.CAPTION_PROMPT, "a blue square", "caption")]
    assert got[0].pixels.shape == (3, 4, 4) and got[0].pixels[0].min() > 0.9 and got[0].pixels[2].max() < -0.9
    rows = {"picture": [red], "question": ["What colour?"], "answers": [[{"answer": "red"}, {"answer": "pink"},
                                                                         {"answer": "red"}]]}
    datasets.Dataset.from_dict(rows).cast_column("picture", datasets.Image()).save_to_disk(str(tmp_path / "vqa"))
    got = vqa.read_dataset(str(tmp_path / "vqa"), "train", 4, image_column="picture")
    assert (got[0].question, got[0].answer, got[0].type) == ("What colour?", "red", "vqa")
    broken = datasets.Dataset.from_dict({"image": [{"bytes": b"\x89PNG broken", "path": None}], "caption": ["x"]})
    broken.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(DataError, match=r"broken\[train\]\[0\]: field 'image': not a readable image"):
        vqa.read_dataset(str(tmp_path / "broken"), "train", 4)
    with pytest.raises(DataError, match="no column|missing field 'image'"):
        vqa.read_dataset(str(tmp_path / "vqa"), "train", 4)
