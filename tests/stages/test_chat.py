"""`mmctl chat`: what a person sees in a terminal, and piped conversations — each reply what `mmctl generate`
(or decoding the conversation's prompt directly) gives for the same conversation, greedily."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time

from tests.cli import ENV, mmctl


def chat(checkpoint, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmctl", "chat", str(checkpoint), *args], input="\n".join(lines),
                          capture_output=True, text=True, env=ENV, timeout=600)


def generated(checkpoint, prompt: str, *args: str) -> str:
    out = mmctl("generate", str(checkpoint), "-p", prompt, "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["completions"][0]["completion"]


def decoded(checkpoint, messages: list[dict], max_new_tokens: int) -> str:
    """The reply to `messages` decoded directly: the chat template's prompt, greedy, up to the end of the turn."""
    from mmctl import checkpoints
    from mmctl.data.chat import prompt_ids, stop_ids
    from mmctl.generate import SamplingConfig, generate

    model, tok = checkpoints.load(checkpoint)
    out = generate(model, [prompt_ids(messages, tok)], SamplingConfig(max_new_tokens=max_new_tokens),
                   stop_token_ids=stop_ids(tok))
    return tok.decode(out.completions[0].ids, skip_special_tokens=True)


def test_piped_conversation_equals_generate(chat_checkpoint):
    done = chat(chat_checkpoint, ["Hello there", "What is 2 + 3?"], "--max-new-tokens", "6")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.split("\n")[:2]
    assert first == generated(chat_checkpoint, "Hello there", "--chat", "--max-new-tokens", "6")
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is 2 + 3?"}]
    assert second == decoded(chat_checkpoint, history, 6)


def test_commands_system_and_reset(chat_checkpoint):
    done = chat(chat_checkpoint, ["/system Answer briefly.", "Hi", "/reset", "Hi", "//slash"], "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    replies = done.stdout.split("\n")
    system = [{"role": "system", "content": "Answer briefly."}]
    assert replies[0] == decoded(chat_checkpoint, [*system, {"role": "user", "content": "Hi"}], 4)
    assert replies[1] == decoded(chat_checkpoint, [*system, {"role": "user", "content": "Hi"}], 4)  # reset
    assert "system message set" in done.stderr and "new conversation" in done.stderr
    assert replies[2] == decoded(chat_checkpoint, [*system, {"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": replies[1]},
                                                   {"role": "user", "content": "/slash"}], 4)


def test_history_is_trimmed_to_the_context(chat_checkpoint):
    """The test model's context is 64 tokens: a long conversation keeps going, its oldest turns dropped."""
    done = chat(chat_checkpoint, [f"Tell me about the number {i} please" for i in range(6)], "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split("\n")) >= 6 and "oldest" in done.stderr and "dropped" in done.stderr


def test_errors_end_a_piped_session_with_their_code(chat_checkpoint, checkpoint, tmp_path):
    bad = chat(chat_checkpoint, ["Hi", "/nope", "Hi"], "--max-new-tokens", "2")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: /nope: not a command")
    assert len([line for line in bad.stdout.split("\n") if line]) <= 1  # the reply before it, nothing after
    image = chat(chat_checkpoint, ["/image nowhere.png"], "--max-new-tokens", "2")
    assert image.returncode != 0 and "language model" in image.stderr and "Traceback" not in image.stderr
    long = chat(chat_checkpoint, ["word " * 80], "--max-new-tokens", "8")
    assert long.returncode == 2 and "do not fit the model's context (64 tokens)" in long.stderr
    missing = chat(tmp_path / "none", ["Hi"])
    assert missing.returncode == 3 and "Traceback" not in missing.stderr


def test_plain_language_model_continues_each_line(checkpoint):
    done = chat(checkpoint, ["Once upon a time", "Tom"], "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [generated(checkpoint, p, "--max-new-tokens", "5")
                                           for p in ("Once upon a time", "Tom")]


def test_vlm_conversation_about_an_image(vlm_dir, tmp_path):
    from mmctl.data import shapes

    shapes.render(shapes.scene(__import__("random").Random(0), "train"), 16).save(tmp_path / "s.png")
    done = chat(vlm_dir, ["What colour is the circle?", "And the square?"], "--image", str(tmp_path / "s.png"),
                "--max-new-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == generated(vlm_dir, "What colour is the circle?", "--image",
                                                   str(tmp_path / "s.png"), "--max-new-tokens", "4")


def test_in_a_terminal(chat_checkpoint):
    """A pseudo-terminal: the banner, the `> ` prompt, the reply streamed, /help, and /quit."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mmctl", "chat", str(chat_checkpoint), "--max-new-tokens", "6"],
                            stdin=slave, stdout=slave, stderr=slave, env={**ENV, "TERM": "dumb"}, close_fds=True)
    os.close(slave)
    seen = ""

    def until(pattern: str, timeout: float = 300) -> str:
        nonlocal seen
        end = time.monotonic() + timeout
        while not re.search(pattern, seen):
            assert time.monotonic() < end, f"no {pattern!r} in {seen!r}"
            if select.select([master], [], [], 1)[0]:
                try:
                    seen += os.read(master, 4096).decode(errors="replace")
                except OSError:
                    break
        return seen

    try:
        until(r"/help lists the commands.*\n.*> ")
        mark = len(seen)
        os.write(master, b"Hello there\r")
        until(r"Hello there\r?\n(.*)\r?\n> ")
        reply = re.search(r"Hello there\r?\n(.*?)\r?\n> ", seen[mark:], re.S).group(1)
        os.write(master, b"/help\r")
        until(r"/image PATH")
        os.write(master, b"/quit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    reply = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", reply)
    assert reply == generated(chat_checkpoint, "Hello there", "--chat", "--max-new-tokens", "6")
