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


def test_the_working_is_column_arithmetic_ending_in_the_answer():
    from mmctl.data.synthetic import Problem

    worked = {"What is 47 + 38?": (85, "7+8=15, 4+3+1=8, so 85"), "What is 99 + 1?": (100, "9+1=10, 9+0+1=10, so 100"),
              "What is 52 - 38?": (14, "2-8+10=4, 5-3-1=1, so 14"),
              "What is 100 - 1?": (99, "0-1+10=9, 0-0-1+10=9, 1-0-1=0, so 99"),
              "What is 47 * 6?": (282, "7*6=42, 4*6+4=28, so 282"), "What is 7 - 7?": (0, "7-7=0, so 0")}
    for question, (answer, working) in worked.items():
        assert Problem(question, answer).working() == working
    for p in arithmetic_problems(3000, 1):  # every step a true equation, the last number the answer
        *steps, last = p.working().split(", ")
        assert last == f"so {p.answer}"
        for step in steps:
            left, right = step.split("=")
            assert eval(left) == int(right)
