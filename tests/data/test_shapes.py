"""The shapes set: answers true of the pixels drawn, types and yes/no balanced, held-out pairs only in test."""

from __future__ import annotations

import random
import re
from collections import Counter

from mmctl.data import shapes  # noqa: E402


def test_what_is_drawn_is_what_is_said():
    rng = random.Random(0)
    for _ in range(200):
        scene = shapes.scene(rng, "train")
        image = shapes.render(scene, 48)
        for s in scene:  # a shape's centre has its colour; the caption names it with its place
            assert image.getpixel((int((s.column + 0.5) * 16), int((s.row + 0.5) * 16) + 2)) == shapes.COLOURS[s.colour]
            assert f"{s.size} {s.name}" in shapes.caption(scene)
        occupied = {(s.row, s.column) for s in scene}
        for row in range(3):
            for column in range(3):
                if (row, column) not in occupied:
                    assert image.getpixel((column * 16 + 8, row * 16 + 8)) == shapes.BACKGROUND


def test_answers_follow_the_scene():
    rng = random.Random(1)
    for _ in range(300):
        scene = shapes.scene(rng, "train")
        for kind in shapes.TYPES:
            asked = shapes.question(rng, scene, kind)
            if asked is None:
                continue
            q, a = asked
            names = {s.name: s for s in scene}
            if kind == "count":
                assert a == str(len(scene))
            elif kind == "position":
                assert names[q.removeprefix("Where is the ").removesuffix("?")].where == a
            elif kind == "exists":
                name = q.removeprefix("Is there a ").removesuffix("?")
                assert (name in names) == (a == "yes")
            elif kind == "relation":
                m = re.fullmatch(r"Is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", q)
                first, second = names[m[1]], names[m[3]]
                holds = {"left of": first.column < second.column, "right of": first.column > second.column,
                         "above": first.row < second.row, "below": first.row > second.row}[m[2]]
                assert a == ("yes" if holds else "no")
            elif kind == "colour":
                kind_ = q.removeprefix("What colour is the ").removesuffix("?")
                assert [s.colour for s in scene if s.kind == kind_] == [a]
            elif kind == "shape":
                where = q.removeprefix("What shape is ").removeprefix("at the ").removeprefix("in the ").rstrip("?")
                assert [s.kind for s in scene if s.where == where] == [a]


def test_types_and_answers_are_balanced_and_held_out_pairs_stay_out_of_training():
    train = list(shapes.items(600, 0, "train", size=32))
    assert Counter(i["type"] for i in train) == {t: 100 for t in shapes.TYPES}
    for kind in ("relation", "exists"):
        yes = sum(i["answer"] == "yes" for i in train if i["type"] == kind)
        assert 35 <= yes <= 65, (kind, yes)
    counts = Counter(i["answer"] for i in train if i["type"] == "count")
    assert min(counts.values()) >= 20
    assert not any(i["held_out"] for i in train)
    assert not any(name in i["caption"] for i in train for name in ("red triangle", "blue circle", "green square"))
    test = list(shapes.items(60, 0, "test", size=32))
    assert all(i["held_out"] for i in test)
    again = list(shapes.items(600, 0, "train", size=32))
    assert [(i["question"], i["answer"], i["image"].tobytes()) for i in again] == [
        (i["question"], i["answer"], i["image"].tobytes()) for i in train]


def test_labels_are_the_scene_cell_by_cell():
    scene = [shapes.Shape("square", "blue", "small", 0, 2), shapes.Shape("circle", "red", "large", 2, 0)]
    y = shapes.labels(scene)
    colours, kinds = list(shapes.COLOURS), list(shapes.KINDS)
    assert y[:9] == [0, 0, 1 + colours.index("blue"), 0, 0, 0, 1 + colours.index("red"), 0, 0]
    assert y[9:18] == [0, 0, 1 + kinds.index("square"), 0, 0, 0, 1 + kinds.index("circle"), 0, 0]
    assert y[18] == 1  # two shapes: the count's class is count − 1
