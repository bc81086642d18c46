"""Image–text examples for the VLM, and their rows: one chat turn each — the image and a question from the user,
the answer from the assistant — with the image placeholder expanded to the image's tokens and the loss on the
answer only (its tokens and the end-of-turn token; `train_on_question` also trains the question's text, never
the image slots, which have no next token to predict).

Sources: the built-in `shapes` set (`mmctl/data/shapes.py`: questions of six types, or captions) and JSONL lines
`{"image": path, "question": str, "answer": str | number, "type": str (optional)}` or `{"image": path,
"caption": str}` (a caption becomes the answer to "Describe the image."), the image path relative to the JSONL
file. Images are read and preprocessed once, as they are listed (a tiny set's pixels fit in memory; an
unreadable image stops the run with one line naming it and its line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmctl.errors import DataError

CAPTION_PROMPT = "Describe the image."


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


def shapes(n: int, seed: int, split: str, size: int, captions: bool = False) -> list[Example]:
    """`n` examples of the built-in shapes set, rendered at `size` pixels."""
    from mmctl.data import images
    from mmctl.data import shapes as generator

    out = []
    for item in generator.items(n, seed, split, size):
        pixels = images.pixels(item["image"], size)
        if captions:
            out.append(Example(pixels, CAPTION_PROMPT, item["caption"], "caption", item["held_out"]))
        else:
            out.append(Example(pixels, item["question"], item["answer"], item["type"], item["held_out"]))
    return out


def read_jsonl(path: str | Path, size: int, limit: int | None = None) -> list[Example]:
    """Examples of a JSONL file (see the module docstring), at most `limit`."""
    from mmctl.data import images, jsonl

    out = []
    for where, record in jsonl.records(path):
        if limit is not None and len(out) >= limit:
            break
        image = jsonl.field(record, "image", str, where)
        if "caption" in record:
            question, answer, kind = CAPTION_PROMPT, jsonl.field(record, "caption", str, where), "caption"
        else:
            question = jsonl.field(record, "question", str, where)
            answer = str(jsonl.field(record, "answer", (str, int, float), where))
            kind = str(record.get("type", "vqa"))
        try:
            picture = images.load(Path(path).parent / image)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        out.append(Example(images.pixels(picture, size), question, answer.strip(), kind))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def messages(question: str, answer: str | None = None) -> list[dict]:
    """The chat turn: the image placeholder and the question from the user (and the answer from the assistant)."""
    from mmctl.tokenizer.bpe import IMAGE

    turn = [{"role": "user", "content": f"{IMAGE}\n{question}"}]
    return turn + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def encode(example: Example, tok, image_token_id: int, tokens_per_image: int, train_on_question: bool = False
           ) -> tuple[list[int], list[int]]:
    """(ids with the image expanded, mask): 1 where the token is trained as a target."""
    from mmctl.data.chat import tokenize

    ids, mask = tokenize(messages(example.question, example.answer), tok)
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
