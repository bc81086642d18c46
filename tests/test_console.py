"""Progress: a live bar on a terminal, plain periodic lines off one; JSON on stdout."""

import io
import json

from rich.console import Console

from mmctl import console as con


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_off_a_tty_every_few_seconds():
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=False, width=200)
    clock = Clock()
    with con.Progress(100, "train", every=5.0, out=out, clock=clock) as p:
        for step in range(1, 101):
            clock.t += 0.5  # 2 steps per second: a line every 10 steps
            p.update(step, loss=1.0 / step)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("train: 10/100 (10%)  loss 0.1  eta 45s")
    assert lines[-1].startswith("train: 100/100 (100%)")


def test_live_bar_on_a_terminal():
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=True, width=120)
    with con.Progress(3, "encode", out=out) as p:
        for i in range(1, 4):
            p.update(i, mb_s=12.5)
    assert "encode" in buf.getvalue() and "3/3" in buf.getvalue()


def test_emit_json_goes_to_stdout(capsys):
    con.emit_json({"a": 1})
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"a": 1} and captured.err == ""


def test_format_duration():
    assert [con.format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m05s"]
