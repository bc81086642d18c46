"""Procedural corpora written by this project, so every default recipe runs offline and learnably.

- `stories(n, seed)`: templated "tiny stories" (after Eldan & Li 2023's TinyStories, which showed that a few
  million parameters can learn fluent simple English). A small cast, places and objects, and a fixed plot shape
  (setting → discovery → problem → help → resolution → moral) give text a tiny model can visibly learn.
- `arithmetic(n, seed)`: problems with exact answers (`Problem.question`, `Problem.answer`), for pretraining
  text, for exact-match evaluation and for RL with verifiable rewards. A fixed tenth of all problems (chosen by
  a hash of the problem, not by seed) is held out: training text never contains them, evaluation uses only
  them, so a score measures arithmetic rather than recall.

Everything is a pure function of its arguments: the same seed gives the same documents on every machine.
Leaves out: anything resembling real-world knowledge; these corpora test the machinery, not the world.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

BUILTIN_SEED = 1_000_003  # the seed of the built-in evaluation sets: no training recipe uses it, so they are fresh

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sara", "Max", "Anna", "Leo", "Zoe", "Sam", "Ella", "Finn", "Ruby", "Jack",
         "Nora", "Oscar"]
ANIMALS = ["cat", "dog", "bunny", "bird", "fox", "bear", "duck", "frog", "mouse", "owl", "turtle", "pig"]
PLACES = ["a small house", "a big forest", "a sunny farm", "a quiet town", "a green park", "a tall castle",
          "a little village", "a busy city"]
LANDMARKS = ["river", "hill", "old tree", "pond", "bridge", "garden", "beach", "school"]
OBJECTS = ["ball", "kite", "box", "hat", "book", "cake", "key", "boat", "drum", "flower", "shell", "map"]
COLORS = ["red", "blue", "yellow", "green", "shiny", "tiny", "big", "soft", "old", "new"]
FEELINGS = ["happy", "sad", "scared", "excited", "curious", "tired", "proud", "surprised"]
PROBLEMS = [
    ("the {obj} fell into the {landmark}", "reached in with a long stick and pulled it out"),
    ("the wind blew the {obj} up into a tree", "climbed the tree carefully and brought it down"),
    ("the {obj} was broken", "found some glue and fixed it together"),
    ("it started to rain on the {obj}", "held a big leaf over it until the sun came back"),
    ("a big dog took the {obj}", "asked the dog nicely and the dog gave it back"),
    ("the {obj} was lost in the tall grass", "looked and looked until they found it"),
]
MORALS = ["sharing makes everyone happy", "it is good to help your friends", "being kind is always right",
          "you should never give up", "friends make hard things easy", "it is fun to try new things"]


def _story(rng: random.Random) -> str:
    return _story_and_facts(rng)[0]


def _story_and_facts(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A story and the facts a question about it can ask for (same random draws as the story alone)."""
    hero, friend = rng.sample(NAMES, 2)
    animal, friend_animal = rng.choice(ANIMALS), rng.choice(ANIMALS)
    place, landmark = rng.choice(PLACES), rng.choice(LANDMARKS)
    obj, color = rng.choice(OBJECTS), rng.choice(COLORS)
    feeling, later = rng.choice(FEELINGS), rng.choice(["happy", "proud", "glad"])
    trouble, fix = rng.choice(PROBLEMS)
    trouble = trouble.format(obj=obj, landmark=landmark)
    opening = rng.choice(["Once upon a time", "One day", "Long ago", "One sunny morning"])
    lines = [
        f"{opening}, there was a little {animal} named {hero}. {hero} lived in {place} near the {landmark}.",
        f"{hero} found a {color} {obj} and felt very {feeling}.",
        f"{hero} wanted to show the {obj} to {friend}, a {friend_animal} who lived by the {landmark}.",
        f"But then {trouble}. {hero} was sad and said, \"Oh no! What can I do?\"",
        f"{friend} said, \"Do not worry, I will help you.\" {friend} {fix}.",
        f"{hero} smiled and said, \"Thank you, {friend}!\" They played with the {obj} all day.",
        f"{hero} felt {later}. {hero} learned that {rng.choice(MORALS)}.",
    ]
    if rng.random() < 0.5:  # vary the shape a little so the model cannot memorise one template
        lines.insert(2, f"The {obj} was {color} and very special to {hero}.")
    facts = {"hero": hero, "friend": friend, "object": obj, "landmark": landmark, "animal": animal}
    return " ".join(lines), facts


def stories(n: int, seed: int) -> Iterator[str]:
    """`n` templated tiny stories, deterministic in `seed`."""
    rng = random.Random(f"stories:{seed}")
    for _ in range(n):
        yield _story(rng)


QUESTIONS = [  # (question about the hero, the fact that answers it)
    ("Who helped {hero}?", "friend"),
    ("What did {hero} find?", "object"),
    ("What was {hero} near?", "landmark"),
    ("What kind of animal was {hero}?", "animal"),
]


def story_quiz(n: int, seed: int) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """`n` (story, [(question, answer)] — every question of QUESTIONS, in a seeded order) pairs about fresh
    stories: dense supervision, four answers read off each story rather than one."""
    rng = random.Random(f"story-quiz:{seed}")
    for _ in range(n):
        story, facts = _story_and_facts(rng)
        asked = rng.sample(QUESTIONS, len(QUESTIONS))
        yield story, [(question.format(hero=facts["hero"]), facts[key]) for question, key in asked]


def story_questions(n: int, seed: int) -> Iterator[tuple[str, str, str]]:
    """`n` (story, question, one-word answer) triples about fresh stories: who helped, what was found, where,
    which animal — answers read off the story, so they are exact."""
    rng = random.Random(f"story-questions:{seed}")
    for _ in range(n):
        story, facts = _story_and_facts(rng)
        question, key = rng.choice(QUESTIONS)
        yield story, question.format(hero=facts["hero"]), facts[key]


@dataclass(frozen=True)
class Problem:
    """An arithmetic question (`What is a op b?`) with its exact integer answer."""

    question: str
    answer: int

    def working(self) -> str:
        """The answer worked out digit by digit, the number last: "7+8=15, 4+3+1=8, so 85" for 47 + 38.

        A tiny model cannot add two numbers in one token's step, but it can do one column at a time when each
        step's inputs are right before it (the scratchpad of Lee et al. 2023, "Teaching Arithmetic to Small
        Transformers"); the reader — and `last_number` extraction — take the number after "so"."""
        a, op, b = self.question.removeprefix("What is ").removesuffix("?").split()
        return ", ".join(_columns(int(a), op, int(b)) + [f"so {self.answer}"])

    def text(self) -> str:
        return f"Question: {self.question}\nAnswer: {self.working()}"


def _columns(a: int, op: str, b: int) -> list[str]:
    """One step per digit of `a`, from the right: the digits, the carry or borrow, the column's result."""
    digits = [int(d) for d in reversed(str(a))]
    if op == "*":  # b is one digit
        steps, carry = [], 0
        for d in digits:
            value = d * b + carry
            steps.append(f"{d}*{b}" + (f"+{carry}" if carry else "") + f"={value}")
            carry = value // 10
        return steps
    other = [int(d) for d in reversed(str(b))]
    width = max(len(digits), len(other))
    digits, other = digits + [0] * (width - len(digits)), other + [0] * (width - len(other))
    steps, carry = [], 0
    for x, y in zip(digits, other, strict=True):
        if op == "+":
            value = x + y + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={value}")
            carry = value // 10
        else:  # a ≥ b: borrow ten from the next column when this one goes below zero
            value = x - y - carry
            borrow = value < 0
            steps.append(f"{x}-{y}" + (f"-{carry}" if carry else "") + ("+10" if borrow else "") +
                         f"={value + 10 * borrow}")
            carry = int(borrow)
    return steps


def held_out(question: str) -> bool:
    """Whether a problem belongs to the held-out tenth (a property of the problem, the same on every machine)."""
    return int.from_bytes(hashlib.blake2b(question.encode(), digest_size=4).digest(), "little") % 10 == 0


def arithmetic_problems(n: int, seed: int, split: str = "train", max_operand: int = 99,
                        ops: str = "+-*") -> Iterator[Problem]:
    """`n` problems `a op b` with operands in [0, max_operand] from the `train` or held-out `test` split;
    subtraction never goes below zero."""
    rng = random.Random(f"arithmetic:{seed}")
    made = 0
    while made < n:
        op = rng.choice(ops)
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and b > a:
            a, b = b, a
        if op == "*":  # keep products small enough for a tiny model to learn
            b = rng.randint(0, 9)
        question = f"What is {a} {op} {b}?"
        if held_out(question) != (split == "test"):
            continue
        made += 1
        yield Problem(question, {"+": a + b, "-": a - b, "*": a * b}[op])


def arithmetic(n: int, seed: int) -> Iterator[str]:
    """Training-split arithmetic problems rendered as pretraining text (`Question: … Answer: …`)."""
    for problem in arithmetic_problems(n, seed):
        yield problem.text()
