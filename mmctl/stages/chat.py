"""`mmctl chat`: talk to a checkpoint in the terminal.

Each line you type is a user turn; the reply streams as it is decoded, through the checkpoint's chat template, and
the conversation is kept — its oldest turns dropped (and said so) when it outgrows the model's context. A plain
language model (no chat template) has no conversation: each line is a prompt it continues. Lines that begin with
`/` are commands (`/help`). With stdin not a terminal (a pipe, a file) each line is one message and only the
replies are printed, one after another, so a conversation can be scripted and tested; an error there ends the
session with its exit code, where a person at the terminal is told and goes on. The model itself, the prompt,
the history and the decoding live in mmctl/session.py, which `mmctl serve` shares.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from mmctl.console import console
from mmctl.errors import MmctlError, UsageError
from mmctl.generate import SamplingConfig
from mmctl.recipe import option

HELP = """commands:
  /reset         start a new conversation (the system message stays)
  /system TEXT   set the system message (/system alone removes it)
  /image PATH    a new conversation about this image (a vision-language model sees one image at a time)
  /help          this list
  /quit          leave (so do Ctrl-D and Ctrl-C at the prompt)
a line that begins with // sends the rest with one /"""


@dataclass
class ChatConfig:
    checkpoint: str = option(None, "the checkpoint directory", required=True)
    system: str | None = option(None, "the system message the conversation starts with")
    image: str | None = option(None, "an image file the conversation is about (a vision-language model)")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "auto: cuda, then mps, then cpu")
    sampling: SamplingConfig = option(SamplingConfig, "how tokens are picked (mmctl/generate.py)")


class Conversation:
    """The turns so far, the system message and the image, and the commands that change them."""

    def __init__(self, session, system: str | None):
        self.session, self.system, self.pixels, self.turns = session, system, None, []

    def messages(self, text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        first = self.pixels is not None and not self.turns  # the image goes with the conversation's first message
        return [*system, *self.turns, self.session.ask(text, image=first)]

    def command(self, line: str) -> str:
        """Carry out a /command; what to tell the user."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/reset":
            self.turns = []
            return "new conversation"
        if name == "/system":
            self.system = arg or None
            return f"system message set: {arg}" if arg else "system message removed"
        if name == "/image":
            if not arg:
                raise UsageError("/image PATH: which image?")
            self.pixels, self.turns = self.session.image(arg), []
            return f"new conversation about {arg}"
        if name == "/help":
            return HELP
        raise UsageError(f"{name}: not a command (/help lists them; // sends a line that begins with /)")


def run(cfg: ChatConfig) -> None:
    from mmctl.runtime import Dist, announce, pick_device
    from mmctl.session import Session

    session = Session(cfg.checkpoint, device=pick_device(cfg.device))
    talk = Conversation(session, cfg.system)
    if cfg.image is not None:
        talk.pixels = session.image(cfg.image)
    if cfg.system and not session.chat:
        raise UsageError(f"--system: {cfg.checkpoint} has no chat template (a plain language model continues text)")
    interactive = sys.stdin.isatty()
    if interactive:
        announce(Dist(device=str(session.model.device)))
        kind = "a chat model" if session.chat else "a language model without a chat template: each line is a " \
                                                   "prompt it continues"
        console.print(f"{cfg.checkpoint}: {kind}, context {session.context} tokens. /help lists the commands.",
                      soft_wrap=True)  # the terminal wraps a long path; rich would break the line itself
    while True:
        line = _read(interactive)
        if line is None or line.strip() in ("/quit", "/exit"):
            return
        if not line.strip():
            continue
        try:
            if line.startswith("/") and not line.startswith("//"):
                console.print(talk.command(line.strip()), highlight=False, markup=False)
            else:
                _reply(session, talk, line[1:] if line.startswith("//") else line, cfg.sampling, interactive)
        except MmctlError as e:
            if not interactive:
                raise
            for problem in e.problems:
                console.print(f"[red]error:[/red] {problem}", highlight=False)


def _read(interactive: bool) -> str | None:
    """The next line (None at the end of input, or Ctrl-D / Ctrl-C at the prompt)."""
    if not interactive:
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    try:
        return input("> ")
    except (EOFError, KeyboardInterrupt):
        sys.stdout.write("\n")
        return None


def _reply(session, talk: Conversation, text: str, sampling: SamplingConfig, interactive: bool) -> None:
    """Stream the model's reply to `text`; a chat model keeps the turn (Ctrl-C stops the reply and forgets it)."""
    messages, dropped = session.fit(talk.messages(text), sampling.max_new_tokens)
    if dropped:
        console.print(f"(the conversation outgrew the model's {session.context}-token context: its oldest "
                      f"{dropped} turn{'s' if dropped > 1 else ''} dropped)")
        talk.turns = messages[1 if messages[0]["role"] == "system" else 0:-1]
    pixels = talk.pixels[None] if talk.pixels is not None else None

    def say(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    try:
        reply = session.complete([session.prompt(messages)], sampling, pixels=pixels, on_text=[say])[0]
    except KeyboardInterrupt:
        if not interactive:
            raise
        sys.stdout.write("\n")
        console.print("(stopped; the reply is forgotten)")
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if session.chat:
        talk.turns = [*messages[1 if messages[0]["role"] == "system" else 0:],
                      {"role": "assistant", "content": reply.text}]
