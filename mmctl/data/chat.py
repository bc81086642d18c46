"""Chat rendering: messages → the text, token ids and assistant mask a chat model is trained and prompted with.

The template is the Jinja2 `chat_template` of tokenizer_config.json, rendered the way transformers renders it
(sandboxed, with trim_blocks / lstrip_blocks), so mmctl and `AutoTokenizer.apply_chat_template` produce the same
text for the same messages. The template marks what the assistant says with `{% generation %}…{% endgeneration %}`;
`tokenize` turns those spans into the mask SFT trains on — the same mask as transformers'
`return_assistant_tokens_mask=True` (and TRL's `assistant_only_loss`).

How the spans are found: while rendering, the generation block wraps its text in two private-use characters that
no message may contain; their positions are the spans' character offsets, and a token is in the mask when its
characters overlap a span (transformers records the same offsets with a stateful Jinja extension).
"""

from __future__ import annotations

from functools import cache

from mmctl.errors import DataError, UnsafeInputError, UsageError

ROLES = ("system", "user", "assistant")
START, END = "\ue000", "\ue001"  # Unicode private-use code points: mark a {% generation %} span while rendering
MAX_CHARS = 10_000_000  # a template that renders more than this for one conversation is broken or hostile


@cache
def _compile(template: str):
    from jinja2 import TemplateError, nodes
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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _render_marked(messages: list[dict], template: str | None, add_generation_prompt: bool, where: str) -> str:
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    if not template:
        raise UsageError("the tokenizer has no chat_template (tokenizer_config.json); chat data needs one")
    if not isinstance(template, str):
        raise DataError(f"{where}: expected the template's text, got {type(template).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UsageError(f"message {i}: expected {{role: system|user|assistant, content: text}}, got {m!r}")
        if START in m["content"] or END in m["content"]:
            raise DataError(f"message {i}: contains the code point U+E000 or U+E001, reserved for rendering")
    from jinja2 import TemplateSyntaxError

    try:
        text = _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except TemplateSyntaxError as e:
        raise DataError(f"{where}: not a valid Jinja template ({e})") from None
    except SecurityError as e:
        raise UnsafeInputError(f"{where}: refused by the sandbox ({e})") from None
    except (TemplateError, RecursionError, TypeError, ValueError) as e:
        raise DataError(f"{where}: failed to render ({type(e).__name__}: {e})") from None
    if len(text) > MAX_CHARS:
        raise DataError(f"{where}: rendered {len(text):,} characters for one conversation (limit "
                        f"{MAX_CHARS:,})")
    return text


def render(messages: list[dict], template: str | None, add_generation_prompt: bool = False,
           where: str = "chat_template") -> str:
    """The chat as text, ready for `Tokenizer.encode_special`. `where` names the template in errors."""
    return _render_marked(messages, template, add_generation_prompt, where).replace(START, "").replace(END, "")


def spans(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Text with the marks removed, and each marked span as (start, end) character offsets into it."""
    import re

    text, found, position, start = [], [], 0, 0
    for piece in re.split(f"([{START}{END}])", marked):
        if piece == START:
            start = position
        elif piece == END:
            found.append((start, position))
        else:
            text.append(piece)
            position += len(piece)
    return "".join(text), found


def tokenize(messages: list[dict], tok, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask): 1 for every token of the template's `{% generation %}` spans — the
    assistant's words and its end-of-turn token — 0 elsewhere."""
    text, marked = spans(_render_marked(messages, tok.chat_template, add_generation_prompt, template_of(tok)))
    ids, offsets = tok.encode_special_with_offsets(text)
    mask = [int(any(s < e_span and e > s_span for s_span, e_span in marked)) for s, e in offsets]
    return ids, mask


def prompt_ids(messages: list[dict], tok) -> list[int]:
    """The ids that ask a chat model for the assistant's next turn: the conversation so far through the
    tokenizer's chat template, with the generation prompt."""
    return tok.encode_special(render(messages, tok.chat_template, add_generation_prompt=True, where=template_of(tok)))


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
    _, offsets = tok.encode_special_with_offsets(text)
    return [messages[bisect.bisect_right(ends, start)]["role"] for start, _ in offsets]


def template_of(tok) -> str:
    """Where a tokenizer's chat template comes from, for error messages."""
    return f"{tok.path / 'tokenizer_config.json'}: chat_template"
