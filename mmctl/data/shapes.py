"""Shapes: a procedural image–text set that a tiny vision-language model can learn on a CPU, with exact answers.

A scene is 1–3 shapes on a light background, each a kind (circle, square, triangle), a colour (red, green,
blue, yellow, purple), a size (small, large) and a cell of a 3 × 3 grid (top / middle / bottom × left / center /
right); no two shapes share a cell, so every position and relation has one answer. Each scene comes with a
caption ("a large red circle at the top left and a small blue square in the middle") and questions of six types,
each type's answers balanced:

    count      How many shapes are there?                    1 | 2 | 3
    colour     What colour is the circle?                    (asked only when one shape is a circle)
    shape      What shape is at the top left?                (an occupied cell)
    position   Where is the red circle?                      top left | … | bottom right
    relation   Is the red circle left of the blue square?    yes | no (left of / right of / above / below)
    exists     Is there a green triangle?                    yes | no — "no" asks for an absent object, so a
                                                             model that says "yes" to it hallucinates

Composition is tested by combinations training never shows: `HELD_OUT` colour–kind pairs (a red triangle, a
blue circle, a green square) never appear in a `train` scene; `test` scenes contain one, and their items say so
(`held_out`). Everything is a pure function of (n, seed, split, size): the same items on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (150, 60, 190)}
SIZES = ("small", "large")
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
HELD_OUT = {("red", "triangle"), ("blue", "circle"), ("green", "square")}
TYPES = ("count", "colour", "shape", "position", "relation", "exists")
CHANCE = {"count": 1 / 3, "colour": 1 / len(COLOURS), "shape": 1 / len(KINDS), "position": 1 / 9,
          "relation": 1 / 2, "exists": 1 / 2}
BACKGROUND = (235, 235, 235)
MOST = 3  # shapes in a scene at most (at least 1)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int  # 0..2, top to bottom
    column: int  # 0..2, left to right

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def where(self) -> str:
        return "middle" if (self.row, self.column) == (1, 1) else f"{ROWS[self.row]} {COLUMNS[self.column]}"


def scene(rng: random.Random, split: str) -> list[Shape]:
    """1–3 shapes in distinct cells with distinct colour–kind names; a test scene holds one held-out pair, a train
    scene none."""
    n = rng.randint(1, MOST)
    cells = rng.sample(range(9), n)
    allowed = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in HELD_OUT]
    names = rng.sample(allowed, n)
    if split == "test":
        names[rng.randrange(n)] = rng.choice(sorted(HELD_OUT))
    return [Shape(k, c, rng.choice(SIZES), cell // 3, cell % 3) for (c, k), cell in zip(names, cells, strict=True)]


def render(shapes: list[Shape], size: int):
    """The scene as a `size` × `size` RGB PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for s in shapes:
        cx, cy = (s.column + 0.5) * cell, (s.row + 0.5) * cell
        r = cell * (0.42 if s.size == "large" else 0.24)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return image


def labels(shapes) -> list[int]:
    """The scene as 19 class labels, what a `cells` phase trains the ViT to read: each cell's colour (0 empty,
    1.. the colours in order), each cell's kind (0 empty, 1.. the kinds), in reading order, then the count − 1."""
    colour, kind = [0] * 9, [0] * 9
    for s in shapes:
        colour[3 * s.row + s.column] = 1 + list(COLOURS).index(s.colour)
        kind[3 * s.row + s.column] = 1 + KINDS.index(s.kind)
    return colour + kind + [len(shapes) - 1]


def caption(shapes: list[Shape]) -> str:
    """Every shape in reading order: "a large red circle at the top left and a small blue square in the middle"."""
    parts = [f"a {s.size} {s.name} " + ("in the middle" if s.where == "middle" else f"at the {s.where}")
             for s in sorted(shapes, key=lambda s: (s.row, s.column))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def question(rng: random.Random, shapes: list[Shape], kind: str) -> tuple[str, str] | None:
    """(question, answer) of one type about the scene, or None when the scene cannot ask it."""
    if kind == "count":
        return "How many shapes are there?", str(len(shapes))
    if kind == "colour":
        unique = [s for s in shapes if sum(t.kind == s.kind for t in shapes) == 1]
        s = rng.choice(unique) if unique else None
        return (f"What colour is the {s.kind}?", s.colour) if s else None
    if kind == "shape":
        s = rng.choice(shapes)
        return ("What shape is in the middle?" if s.where == "middle" else f"What shape is at the {s.where}?",
                s.kind)
    if kind == "position":
        s = rng.choice(shapes)
        return f"Where is the {s.name}?", s.where
    if kind == "relation":
        if len(shapes) < 2:
            return None
        a, b = rng.sample(shapes, 2)
        relations = {"left of": a.column < b.column, "right of": a.column > b.column, "above": a.row < b.row,
                     "below": a.row > b.row}
        want = rng.random() < 0.5
        options = [r for r, holds in relations.items() if holds == want]
        if not options:
            return None
        return f"Is the {a.name} {rng.choice(options)} the {b.name}?", "yes" if want else "no"
    if kind == "exists":
        if rng.random() < 0.5:
            return f"Is there a {rng.choice(shapes).name}?", "yes"
        present = {(s.colour, s.kind) for s in shapes}
        absent = [(c, k) for c in COLOURS for k in KINDS if (c, k) not in present]
        colour, kind_ = rng.choice(absent)
        return f"Is there a {colour} {kind_}?", "no"
    raise ValueError(f"unknown question type {kind!r}")


def conversations(n: int, questions: int, seed: int, split: str = "train", size: int = 32) -> Iterator[dict]:
    """`n` items {image, turns: [(question, answer), …], shapes, held_out}: up to `questions` questions about each fresh
    scene, of different types (each type in turn leads), as one conversation — dense supervision, several answers
    per image."""
    rng = random.Random(f"shapes-dense:{split}:{seed}")
    for made in range(n):
        shapes = scene(rng, split)
        kinds = TYPES[made % len(TYPES):] + TYPES[:made % len(TYPES)]
        turns = [asked for kind in kinds if (asked := question(rng, shapes, kind)) is not None][:questions]
        yield {"image": render(shapes, size), "turns": turns, "shapes": shapes,
               "held_out": any((s.colour, s.kind) in HELD_OUT for s in shapes)}


def items(n: int, seed: int, split: str = "train", size: int = 32) -> Iterator[dict]:
    """`n` items {image, caption, question, answer, type, shapes, held_out}, question types in turn (so each type gets
    n / 6), each about a fresh scene."""
    rng = random.Random(f"shapes:{split}:{seed}")
    made = 0
    while made < n:
        kind = TYPES[made % len(TYPES)]
        shapes = scene(rng, split)
        asked = question(rng, shapes, kind)
        if asked is None:
            continue
        made += 1
        yield {"image": render(shapes, size), "caption": caption(shapes), "question": asked[0],
               "answer": asked[1], "type": kind, "shapes": shapes,
               "held_out": any((s.colour, s.kind) in HELD_OUT for s in shapes)}
