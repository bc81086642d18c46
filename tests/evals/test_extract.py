import pytest

from mmctl.evals.extract import exact_match, extract


@pytest.mark.parametrize("text, how, expected", [
    ("The answer is 42.", "last_number", "42"),
    ("3 apples and 1,250 pears", "last_number", "1,250"),
    ("it costs $7.50 today, -3 tomorrow", "last_number", "-3"),
    ("it costs $7.50", "last_number", "$7.50"),
    ("no digits here", "last_number", None),
    ("work... #### 18\nmore", "hashes", "18"),
    ("no marker 18", "hashes", None),
    ("  Paris \n", "exact", "Paris"),
    ("Answer: (B) because", r"regex:\(([A-D])\)", "B"),
    ("Answer: B", r"regex:[A-D]$", "B"),
])
def test_extract(text, how, expected):
    assert extract(text, how) == expected


@pytest.mark.parametrize("prediction, target, ok", [
    ("1,000", 1000, True), ("1000.0", "1000", True), ("$5", 5, True), ("42.", "42", True), ("0.5", 0.5, True),
    ("$7.50", "7.5", True), ("41", 42, False), (None, 42, False), ("Paris", "Paris", True), ("paris", "Paris", False),
])
def test_exact_match(prediction, target, ok):
    assert exact_match(prediction, target) is ok
