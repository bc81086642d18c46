"""A loaded model answering: what `mmctl chat` and `mmctl serve` share.

`Session(checkpoint)` loads any checkpoint dir (mmctl/checkpoints.py) and prepares the fast decode step where it
applies. `prompt(messages)` renders a conversation through the model's chat template (or, for a plain language
model, takes the text as it is), an image as a VLM's content part; `fit(messages, new)` drops the oldest turns
until the prompt and `new` tokens fit the context (the system message stays); `complete(...)` decodes a batch of
prompts greedily or sampled (mmctl/generate.py) and streams each row's text as it is decoded — whole characters
only: a multi-byte character split over two tokens is shown when it is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmctl.errors import UsageError
from mmctl.generate import SamplingConfig


class Detokenizer:
    """Token ids in, the text they add out (special tokens left out; a split UTF-8 character waits for its end)."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


@dataclass
class Reply:
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str  # "stop" (end of turn, a stop string) or "length"


class Session:
    def __init__(self, checkpoint: str, device: str = "auto"):
        from mmctl import checkpoints, hf
        from mmctl.data.chat import stop_ids
        from mmctl.models import fast_decode
        from mmctl.models.vlm import VLM
        from mmctl.runtime import pick_device

        self.checkpoint = checkpoint
        self.model, self.tok = checkpoints.load(checkpoint, device=pick_device(device), vision=True, quantized=True)
        fast_decode.fuse(self.model)
        self.vision = isinstance(self.model, VLM)
        self.chat = (checkpoints.is_chat_model(checkpoint) or self.vision) and bool(self.tok.chat_template)
        lm = self.model.language_model if self.vision else self.model
        self.context = lm.cfg.max_position_embeddings
        self.stops = sorted(set(hf.eos_token_ids(checkpoint)) | set(stop_ids(self.tok) if self.chat
                                                                     else [self.tok.eos_id]))

    def prompt(self, messages: list[dict]) -> list[int]:
        """The ids asking for the assistant's next turn (a plain LM: the last message's text, as a completion). A
        message may hold the image as a content part (`ask(text, image=True)`): it becomes the VLM's image tokens."""
        from mmctl.data.chat import prompt_ids

        if not self.chat:
            return self.tok.encode(messages[-1]["content"])
        ids = prompt_ids(messages, self.tok)
        if self.vision and self.model.image_token_id in ids:
            at = ids.index(self.model.image_token_id)
            ids = ids[:at] + [self.model.image_token_id] * self.model.tokens_per_image + ids[at + 1:]
        return ids

    @staticmethod
    def ask(text: str, image: bool = False) -> dict:
        """The user's message; `image`: it carries the conversation's image (as `mmctl generate --image` asks)."""
        from mmctl.data import vqa

        return vqa.messages(text)[0] if image else {"role": "user", "content": text}

    def fit(self, messages: list[dict], new_tokens: int) -> tuple[list[dict], int]:
        """(the messages whose prompt leaves room for `new_tokens`, how many turns were dropped from the front).
        The system message and the message that carries the image stay; the oldest other turns go first."""
        def pinned(m: dict) -> bool:
            return m["role"] == "system" or not isinstance(m["content"], str)

        dropped = 0
        while len(self.prompt(messages)) + new_tokens > self.context:
            loose = [i for i, m in enumerate(messages[:-1]) if not pinned(m)]
            if not loose:
                raise UsageError(f"the message and {new_tokens} new tokens do not fit the model's context "
                                 f"({self.context} tokens)")
            first = loose[0]  # a user turn goes with the reply that answered it
            pair = first + 1 in loose and messages[first]["role"] == "user"
            messages = messages[:first] + messages[first + (2 if pair else 1):]
            dropped += 1
        return messages, dropped

    def complete(self, prompts: list[list[int]], sampling: SamplingConfig, pixels=None,
                 on_text: list[Callable[[str], None]] | None = None, limits: list[int] | None = None) -> list[Reply]:
        """Decode every prompt in one batch; `on_text[b]` gets row b's new text as it comes; `limits[b]` cuts row
        b at that many new tokens (rows of one batch may ask for fewer than `sampling.max_new_tokens`)."""
        from mmctl.generate import generate

        limits = limits or [sampling.max_new_tokens] * len(prompts)
        text = [Detokenizer(self.tok) for _ in prompts]
        held: list[str | None] = [""] * len(prompts)  # text not shown yet: it may begin a stop string
        hold = max((len(s) for s in sampling.stop_strings), default=1) - 1
        counts = [0] * len(prompts)

        said = [0] * len(prompts)  # characters shown

        def show(b: int, piece: str) -> None:
            if piece and on_text is not None:
                on_text[b](piece)
            said[b] += len(piece)

        def stream(new: list[int | None]) -> None:
            for b, token in enumerate(new):
                if token is None or counts[b] >= limits[b] or token in self.stops or held[b] is None:
                    continue
                counts[b] += 1
                held[b] += text[b].add(token)
                hit = min((held[b].index(s) for s in sampling.stop_strings if s in held[b]), default=None)
                if hit is not None:  # the row's answer ends where its stop string begins
                    show(b, held[b][:hit])
                    held[b] = None
                elif len(held[b]) > hold:
                    show(b, held[b][:len(held[b]) - hold])
                    held[b] = held[b][len(held[b]) - hold:]

        out = generate(self.model, prompts, sampling, stop_token_ids=self.stops, decode=self.tok.decode,
                       on_tokens=stream, pixels=pixels)
        replies = []
        for b, c in enumerate(out.completions):
            ids = c.ids[:limits[b]]
            reason = c.finish_reason if len(c.ids) <= limits[b] else "length"
            answer = self.tok.decode([t for t in ids if t not in self.stops], skip_special_tokens=True)
            if reason == "stop" and isinstance(c.stop, str) and c.stop in answer:  # the stop string is not said
                answer = answer[:answer.index(c.stop)]
            show(b, answer[said[b]:])
            replies.append(Reply(answer, len(ids), len(prompts[b]), reason))
        return replies

    def image(self, source, name: str | None = None):
        """A VLM's pixels of an image: a file's path, or its bytes (io.BytesIO; `name` is what errors call it)."""
        from mmctl.data import images

        if not self.vision:
            raise UsageError(f"{self.checkpoint} is a language model; images go to a vision-language model (an "
                             "`mmctl align-vision` output)")
        return images.pixels(images.load(source, name), self.model.vision.encoder.image_size)
