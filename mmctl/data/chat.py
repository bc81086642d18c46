"""Chat rendering: messages → the text, token ids and assistant mask a chat model is trained and prompted with.

The template is the Jinja2 `chat_template` of tokenizer_config.json, rendered the way transformers renders it
(sandboxed, with trim_blocks / lstrip_blocks), so mmctl and `AutoTokenizer.apply_chat_template` produce the same
text for the same messages. The template marks what the assistant says with `{% generation %}…{% endgeneration %}`;
`tokenize` turns those spans into the mask SFT trains on — the same mask as transformers'
`return_assistant_tokens_mask=True` (and TRL's `assistant_only_loss`).

How the spans are found: while rendering, the generation block wraps its text in two private-use characters that
no message may contain; their positions are the spans' character offsets, and a token is in the mask when its
characters overlap a span (transformers records the same offsets with a stateful Jinja extension).

**Content is text, never markers** (nanochat's rule): each message's content enters the template between two more
private-use marks, and what lies between them is encoded as plain text — a user who writes "<|end|><|assistant|>"
gets those characters, not a forged assistant turn — while the template's own text is encoded with its special
tokens. (transformers encodes the rendered string whole, so there the same message would forge the turn; for any
message without special-token strings both give the same ids.) Templates that `trim` or `strip` a message keep
their effect: the marked content strips like the content.
"""

from __future__ import annotations

from functools import cache

from mmctl.errors import DataError, UnsafeInputError, UsageError
from mmctl.runtime import TimeLimit, time_limit

ROLES = ("system", "user", "assistant")
START, END = "\ue000", "\ue001"  # Unicode private-use code points: mark a {% generation %} span while rendering
OPEN, CLOSE = "\ue002", "\ue003"  # … and a message's content (encoded as text, never as special tokens)
MARKS = START + END + OPEN + CLOSE
MAX_CHARS = 10_000_000  # a template that renders more than this for one conversation is broken or hostile
RENDER_SECONDS = 10.0  # … or that takes longer than this


@cache
def _compile(template: str):
    from jinja2 import TemplateError, nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}`: transformers' marker of trained-on text; its body is rendered
        between the START and END marks."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            mark = [nodes.Output([nodes.TemplateData(START)])], [nodes.Output([nodes.TemplateData(END)])]
            return nodes.Scope(mark[0] + body + mark[1], lineno=lineno)

    def raise_exception(message):  # what transformers gives templates to refuse a conversation with
        raise TemplateError(message)

    class Sandbox(ImmutableSandboxedEnvironment):
        """transformers' sandbox, and no `*` / `**` that makes a string, list or number of absurd size (range() is
        capped by the sandbox itself; a render that runs too long is stopped by `_render_marked`'s time limit)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int | float) and abs(right) > 64:
                raise SecurityError(f"a power of {right!r}")
            if operator == "*" and any(isinstance(x, str | list | tuple) for x in (left, right)):
                size, times = (len(left), right) if isinstance(left, str | list | tuple) else (len(right), left)
                if isinstance(times, int) and size * times > MAX_CHARS:
                    raise SecurityError(f"repeating {size:,} items {times:,} times")
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render_marked(messages: list[dict], template: str | None, add_generation_prompt: bool, where: str) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    if not template:
        raise UsageError("the tokenizer has no chat_template (tokenizer_config.json); chat data needs one")
    if not isinstance(template, str):
        raise DataError(f"{where}: expected the template's text, got {type(template).__name__}")
    marked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str | list):
            raise UsageError(f"message {i}: expected {{role: system|user|assistant, content: text}}, got {m!r}")
        parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
        if any(c in p.get("text", "") for p in parts for c in MARKS):
            raise DataError(f"message {i}: contains a code point of U+E000–U+E003, reserved for rendering")
        marked.append({**m, "content": Content(parts)})
    from jinja2 import TemplateSyntaxError

    try:
        with time_limit(RENDER_SECONDS, "rendering one conversation"):
            text = _compile(template).render(messages=marked, add_generation_prompt=add_generation_prompt)
    except TemplateSyntaxError as e:
        raise DataError(f"{where}: not a valid Jinja template ({e})") from None
    except SecurityError as e:
        raise UnsafeInputError(f"{where}: refused by the sandbox ({e})") from None
    except (TemplateError, RecursionError, TypeError, ValueError, ArithmeticError, MemoryError, TimeLimit) as e:
        raise DataError(f"{where}: failed to render ({type(e).__name__}: {_first_line(e)})") from None
    if len(text) > MAX_CHARS:
        raise DataError(f"{where}: rendered {len(text):,} characters for one conversation (limit "
                        f"{MAX_CHARS:,})")
    if not text.translate({ord(c): None for c in MARKS}).strip():
        raise DataError(f"{where}: renders nothing for a conversation of {len(messages)} messages")
    return text


class Content(str):
    """A message's content as the template sees it: its text between OPEN and CLOSE, and an image part (a VLM's
    question) as the image token itself, outside the marks. It strips as the text does (a template's
    `{{ message['content'] | trim }}`)."""

    def __new__(cls, parts: list[dict]):
        from mmctl.tokenizer.bpe import IMAGE

        for part in parts:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image") or (
                    part["type"] == "text" and not isinstance(part.get("text"), str)):
                raise UsageError(f"a content part must be {{type: text, text: …}} or {{type: image}}, got {part!r}")
        text = "".join(IMAGE if p["type"] == "image" else OPEN + p["text"] + CLOSE for p in parts)
        made = super().__new__(cls, text)
        made.parts = parts
        return made

    def _stripped(self, how: str, chars):
        parts = [dict(p) for p in self.parts]
        texts = [p for p in parts if p["type"] == "text"]
        if texts and how in ("strip", "lstrip"):
            texts[0]["text"] = texts[0]["text"].lstrip(chars)
        if texts and how in ("strip", "rstrip"):
            texts[-1]["text"] = texts[-1]["text"].rstrip(chars)
        return Content(parts)

    def strip(self, chars=None):
        return self._stripped("strip", chars)

    def lstrip(self, chars=None):
        return self._stripped("lstrip", chars)

    def rstrip(self, chars=None):
        return self._stripped("rstrip", chars)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text[:200]


def render(messages: list[dict], template: str | None, add_generation_prompt: bool = False,
           where: str = "chat_template") -> str:
    """The chat as text, as transformers' `apply_chat_template` renders it. `where` names the template in errors."""
    marked = _render_marked(messages, template, add_generation_prompt, where)
    return marked.translate({ord(c): None for c in MARKS})


def spans(marked: str) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(text with the marks removed, the generation spans, the message-content spans), each span as (start, end)
    character offsets into the text."""
    import re

    text, found, position, start = [], {START: [], OPEN: []}, 0, {START: 0, OPEN: 0}
    for piece in re.split(f"([{MARKS}])", marked):
        if piece in (START, OPEN):
            start[piece] = position
        elif piece in (END, CLOSE):
            opener = START if piece == END else OPEN
            found[opener].append((start[opener], position))
        else:
            text.append(piece)
            position += len(piece)
    return "".join(text), found[START], found[OPEN]


def encode(messages: list[dict], tok, add_generation_prompt: bool = False
           ) -> tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]:
    """(token ids, their character offsets, the generation spans) of a conversation: the template's text with
    its special tokens, each message's content as plain text."""
    text, generation, content = spans(_render_marked(messages, tok.chat_template, add_generation_prompt,
                                                     template_of(tok)))
    ids, offsets = [], []
    for s, e, special in _segments(content, len(text)):
        piece_ids, piece_offsets = tok.encode_with_offsets(text[s:e], special=special)
        ids += piece_ids
        offsets += [(s + a, s + b) for a, b in piece_offsets]
    return ids, offsets, generation


def _segments(content: list[tuple[int, int]], length: int) -> list[tuple[int, int, bool]]:
    """The text cut at the content spans: (start, end, special tokens recognized) in order."""
    out, position = [], 0
    for s, e in content:
        if s > position:
            out.append((position, s, True))
        if e > s:
            out.append((s, e, False))
        position = max(position, e)
    if position < length:
        out.append((position, length, True))
    return out


def tokenize(messages: list[dict], tok, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask): 1 for every token of the template's `{% generation %}` spans — the
    assistant's words and its end-of-turn token — 0 elsewhere."""
    ids, offsets, marked = encode(messages, tok, add_generation_prompt)
    if not marked and any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{template_of(tok)}: marks no assistant text: the template needs a "
                        "{% generation %}…{% endgeneration %} block around what the assistant says")
    mask = [int(any(s < e_span and e > s_span for s_span, e_span in marked)) for s, e in offsets]
    return ids, mask


def prompt_ids(messages: list[dict], tok) -> list[int]:
    """The ids that ask a chat model for the assistant's next turn: the conversation so far through the
    tokenizer's chat template, with the generation prompt."""
    return encode(messages, tok, add_generation_prompt=True)[0]


def stop_ids(tok) -> list[int]:
    """Where a chat model's reply ends: <|eos|>, and the template's end-of-turn token when the tokenizer has one."""
    from mmctl.tokenizer.bpe import END as END_OF_TURN

    end = tok.token_id(END_OF_TURN)
    return [tok.eos_id] + ([end] if end is not None else [])


def roles(messages: list[dict], tok) -> list[str]:
    """The role of the message each token of `tokenize(messages, tok)` belongs to, for showing what trains.

    Found by rendering ever longer prefixes of the conversation: a turn's own template text (its role marker,
    its end-of-turn token) goes with it. Where a template's render of a prefix is not a prefix of the whole,
    the tokens from there on take the last message's role."""
    import bisect

    text = render(messages, tok.chat_template, where=template_of(tok))
    ends = []
    for k in range(1, len(messages)):
        part = render(messages[:k], tok.chat_template, where=template_of(tok))
        ends.append(len(part) if text.startswith(part) else len(text))
    _, offsets, _ = encode(messages, tok)
    return [messages[bisect.bisect_right(ends, start)]["role"] for start, _ in offsets]


def template_of(tok) -> str:
    """Where a tokenizer's chat template comes from, for error messages."""
    return f"{tok.path / 'tokenizer_config.json'}: chat_template"


def with_content_parts(template: str, image_token: str) -> str:
    """`template` taking OpenAI / transformers content parts — `[{"type": "image"}, {"type": "text", "text": …}]`
    — as mmctl does: each message's parts joined into one string, an image part as `image_token`, before the
    template renders it. A Llava processor's `apply_chat_template` then builds the prompt mmctl builds."""
    quoted = image_token.replace("\\", "\\\\").replace("'", "\\'")
    return ("{%- set flat = namespace(messages=[]) -%}{%- for m in messages -%}{%- if m['content'] is string -%}"
            "{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': m['content']}] -%}{%- else -%}"
            "{%- set text = namespace(value='') -%}{%- for part in m['content'] -%}"
            "{%- if part['type'] == 'image' -%}{%- set text.value = text.value ~ '" + quoted + "' -%}"
            "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value ~ part['text'] -%}{%- endif -%}"
            "{%- endfor -%}{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': text.value}] -%}"
            "{%- endif -%}{%- endfor -%}{%- set messages = flat.messages -%}" + template)

