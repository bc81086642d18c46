"""The procedural corpora: deterministic, varied, and (arithmetic) exactly right."""

import re

from mmctl.data.synthetic import arithmetic, arithmetic_problems, stories


def test_stories_are_deterministic_and_varied():
    a = list(stories(200, 0))
    assert a == list(stories(200, 0)) and a != list(stories(200, 1))
    assert len(set(a)) == 200
    assert all(s.count(".") >= 7 for s in a)


def test_arithmetic_answers_are_exact():
    for p in arithmetic_problems(500, 0):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p.question).groups()
        assert p.answer == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert p.answer >= 0
    assert next(arithmetic(1, 0)).startswith("Question: What is ")
