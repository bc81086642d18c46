"""Image–text examples for the VLM, and their rows: one chat turn each — the image and a question from the user,
the answer from the assistant (the built-in shapes can ask several questions about one image, as one
conversation) — with the image placeholder expanded to the image's tokens and the loss on the
answer only (its tokens and the end-of-turn token; `train_on_question` also trains the question's text, never
the image slots, which have no next token to predict).

Sources: the built-in `shapes` set (`mmctl/data/shapes.py`: questions of six types, or captions) and JSONL lines
`{"image": path, "question": str, "answer": str | number, "type": str (optional)}` or `{"image": path,
"caption": str}` (a caption becomes the answer to "Describe the image."), the image path relative to the JSONL
file; or a `datasets` save_to_disk dir with an image column (COCO-style captions, VQAv2-style questions). Images
are read and preprocessed once, as they are listed (a tiny set's pixels fit in memory; an unreadable image stops
the run with one line naming it and its line or row).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from mmctl.data.mixture import Source
from mmctl.errors import DataError
from mmctl.recipe import option

CAPTION_PROMPT = "Describe the image."


@dataclass
class ImageSource(Source):
    kind: Literal["shapes", "jsonl", "datasets"] = option(
        None, "shapes (built in) | jsonl ({image, question, answer} or {image, caption} lines) | datasets (a "
              "save_to_disk dir: an image column, caption or question + answer)", required=True)
    path: str | None = option(None, "jsonl: the file (image paths are relative to it); datasets: the dir")
    items: int | None = option(None, "shapes: how many to make; jsonl, datasets: read at most this many", ge=1,
                               le=10**7)
    captions: bool = option(False, "shapes: captions (\"Describe the image.\") instead of questions")
    questions: int = option(1, "shapes: questions about each image, of different types, asked as one conversation "
                               "(more than 1: several answers trained per image)", ge=1, le=6)
    image_column: str = option("image", "datasets: the column holding the image (or its path)")

    COUNT: ClassVar[str] = "items"

    def check(self) -> list[tuple[str, str]]:
        if self.kind == "shapes" and (self.items or 0) > 100_000:  # rendered and held in memory, as every image is
            return [("items", f"{self.items:,}: the built-in shapes set makes at most 100,000")]
        if self.questions > 1 and (self.kind != "shapes" or self.captions):
            return [("questions", "only the built-in shapes' questions come several to an image")]
        return super().check()


def read(source: ImageSource, seed: int, size: int) -> list[Example]:
    """A source's examples, their images at `size` pixels."""
    if source.kind == "shapes":
        return shapes(source.items, seed, "train", size, captions=source.captions, questions=source.questions)
    if source.kind == "jsonl":
        return read_jsonl(source.path, size, source.items)
    return read_dataset(source.path, source.split, size, source.items, source.image_column)


def key(example: Example) -> str:
    """What a mixture splits examples by: the image (every question about one image lands on one side)."""
    return hashlib.blake2b(example.pixels.numpy().tobytes(), digest_size=16).hexdigest()


@dataclass
class Rows:
    """Encoded examples: ids and masks as `encode` makes them, the images stacked (n, 3, H, W)."""

    ids: list[list[int]]
    mask: list[list[int]]
    pixels: object


@dataclass
class Example:
    pixels: object  # (3, size, size) float tensor, preprocessed (mmctl/data/images.py)
    question: str
    answer: str
    type: str = "vqa"  # the question type (shapes: count, colour, …; captions: caption)
    held_out: bool = False  # shapes: a colour–kind pair training never shows
    more: tuple[tuple[str, str], ...] = ()  # further (question, answer) turns about the same image
    scene: tuple = ()  # shapes: the scene's objects (mmctl/data/shapes.py Shape), what a `cells` phase learns


def shapes(n: int, seed: int, split: str, size: int, captions: bool = False, questions: int = 1) -> list[Example]:
    """`n` examples of the built-in shapes set, rendered at `size` pixels (`questions` > 1: each a conversation)."""
    from mmctl.data import images
    from mmctl.data import shapes as generator

    if questions > 1 and not captions:
        return [Example(images.pixels(item["image"], size), *item["turns"][0], "conversation", item["held_out"],
                        tuple(item["turns"][1:]), tuple(item["shapes"]))
                for item in generator.conversations(n, questions, seed, split, size)]
    out = []
    for item in generator.items(n, seed, split, size):
        pixels = images.pixels(item["image"], size)
        if captions:
            out.append(Example(pixels, CAPTION_PROMPT, item["caption"], "caption", item["held_out"],
                               scene=tuple(item["shapes"])))
        else:
            out.append(Example(pixels, item["question"], item["answer"], item["type"], item["held_out"],
                               scene=tuple(item["shapes"])))
    return out


def builtin(items: int, composition_items: int, size: int) -> tuple[list[Example], list[Example]]:
    """The held-out shapes questions `mmctl eval --task shapes-vqa` and align-vision's final evaluation ask:
    fresh scenes (a seed no training source uses), and scenes holding a colour–kind pair training never shows."""
    from mmctl.data.synthetic import BUILTIN_SEED

    return (shapes(items, BUILTIN_SEED, "train", size),
            shapes(composition_items, BUILTIN_SEED, "test", size) if composition_items else [])


def read_jsonl(path: str | Path, size: int, limit: int | None = None) -> list[Example]:
    """Examples of a JSONL file (see the module docstring), at most `limit`."""
    from mmctl.data import jsonl

    return _read(jsonl.records(path), Path(path).parent, size, limit, path)


def read_dataset(path: str, split: str, size: int, limit: int | None = None, image_column: str = "image"
                 ) -> list[Example]:
    """Examples of a `datasets` save_to_disk dir: an image column (decoded images, or paths relative to the dir)
    and `caption` (COCO-style; a list of captions gives its first) or `question` and `answer` (VQAv2-style
    `answers`: the most common of them)."""
    from mmctl.data.sources import dataset_records

    return _read(dataset_records(path, split, undecoded=image_column), Path(path), size, limit, path, image_column)


def _read(records, base: Path, size: int, limit: int | None, name, image_column: str = "image") -> list[Example]:
    from mmctl.data import images

    out = []
    for where, record in records:
        if limit is not None and len(out) >= limit:
            break
        question, answer, kind = _text(record, where)
        try:
            picture = _image(record, image_column, base, where)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        out.append(Example(images.pixels(picture, size), question, answer.strip(), kind))
    if not out:
        raise DataError(f"{name}: no examples")
    return out


def _text(record: dict, where: str) -> tuple[str, str, str]:
    """(question, answer, type) of a record: a caption answers CAPTION_PROMPT."""
    from collections import Counter

    from mmctl.data import jsonl

    if "caption" in record or "captions" in record:
        captions = record.get("caption", record.get("captions"))
        captions = captions if isinstance(captions, list) else [captions]
        if not captions or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{where}: a caption must be a string (or a list of strings)")
        return CAPTION_PROMPT, captions[0], "caption"
    question = jsonl.field(record, "question", str, where)
    if "answer" not in record and isinstance(record.get("answers"), list) and record["answers"]:
        said = [a.get("answer") if isinstance(a, dict) else a for a in record["answers"]]
        if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in said):
            raise DataError(f"{where}: answers must be strings or numbers (or {{\"answer\": …}} mappings)")
        answer = Counter(map(str, said)).most_common(1)[0][0]
    else:
        answer = str(jsonl.field(record, "answer", (str, int, float), where))
    return question, answer, str(record.get("type", record.get("question_type", "vqa")))


def _image(record: dict, column: str, base: Path, where: str):
    """The record's image: a decoded PIL image, {"bytes" | "path"} as datasets stores one, or a path."""
    import io

    from PIL import Image

    from mmctl.data import images

    if column not in record:
        raise DataError(f"missing field {column!r} (has: {', '.join(sorted(record))})")
    value = record[column]
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        if not isinstance(value["bytes"], bytes):
            raise DataError(f"field {column!r}: bytes is {type(value['bytes']).__name__}, expected the image's bytes")
        return images.load(io.BytesIO(value["bytes"]), name=f"field {column!r}")
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if not isinstance(value, str) or not value or "\x00" in value:
        raise DataError(f"field {column!r} is {_kind(value)}, expected an image or a path")
    return images.load(base / value)


def _kind(value) -> str:
    return "an empty string" if value == "" else "a string with a NUL byte" if isinstance(value, str) else \
        type(value).__name__


def messages(question: str, answer: str | None = None, more: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """The chat turn: the image and the question from the user (and the answer from the assistant), then `more`
    question–answer turns about the same image. The image is a content part — the image token is the template's
    to place — so a question that spells "<|image|>" is text."""
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"\n{question}"}]}]
    turn += [{"role": "assistant", "content": answer}] if answer is not None else []
    for q, a in more:
        turn += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return turn


def encode(example: Example, tok, image_token_id: int, tokens_per_image: int, train_on_question: bool = False
           ) -> tuple[list[int], list[int]]:
    """(ids with the image expanded, mask): 1 where the token is trained as a target."""
    from mmctl.data.chat import tokenize

    ids, mask = tokenize(messages(example.question, example.answer, example.more), tok)
    if ids.count(image_token_id) != 1:
        raise DataError(f"the chat template renders {ids.count(image_token_id)} image placeholders for one image")
    at = ids.index(image_token_id)
    if train_on_question:  # everything after the image: the question's words, the turn markers, the answer
        mask = [0] * (at + 1) + [1] * (len(ids) - at - 1)
    return (ids[:at] + [image_token_id] * tokens_per_image + ids[at + 1:],
            mask[:at] + [0] * tokens_per_image + mask[at + 1:])


def prompt(question: str, tok, image_token_id: int, tokens_per_image: int) -> list[int]:
    """The ids that ask the VLM a question about its image (the generation prompt included)."""
    from mmctl.data.chat import prompt_ids

    ids = prompt_ids(messages(question), tok)
    at = ids.index(image_token_id)
    return ids[:at] + [image_token_id] * tokens_per_image + ids[at + 1:]


def batch(rows: Rows, picks: list[int], device) -> dict:
    """Picked rows right-padded to the longest (pad targets untrained), with their images."""
    import torch

    width = max(len(rows.ids[i]) for i in picks)
    ids = torch.zeros(len(picks), width, dtype=torch.long)
    trained = torch.zeros(len(picks), width - 1, dtype=torch.bool)
    for b, i in enumerate(picks):
        ids[b, :len(rows.ids[i])] = torch.tensor(rows.ids[i])
        trained[b, :len(rows.ids[i]) - 1] = torch.tensor(rows.mask[i][1:], dtype=torch.bool)
    valid = torch.arange(width) < torch.tensor([len(rows.ids[i]) for i in picks]).unsqueeze(1)
    return {"ids": ids.to(device), "trained": trained.to(device), "valid": valid.to(device),
            "pixels": rows.pixels[picks].to(device), "real": sum(len(rows.ids[i]) for i in picks)}
