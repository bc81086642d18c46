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


def test_held_out_problems_never_reach_training_text():
    from mmctl.data.synthetic import held_out

    test = {p.question for p in arithmetic_problems(300, 5, split="test")}
    assert all(held_out(q) for q in test) and len(test) > 200
    train = {p.question for p in arithmetic_problems(5000, 0)}
    assert not test & train
