"""Chat rendering: messages → the text (and token ids) a chat model sees, through the tokenizer's own template.

The template is the Jinja2 `chat_template` of tokenizer_config.json, rendered the way transformers renders it
(sandboxed, with trim_blocks / lstrip_blocks, and the `{% generation %}` block that marks assistant text), so
mmctl and `AutoTokenizer.apply_chat_template` produce the same text for the same messages.
"""

from __future__ import annotations

from functools import cache

from mmctl.errors import UsageError

ROLES = ("system", "user", "assistant")


@cache
def _compile(template: str):
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}`: transformers' marker of trained-on text; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    return env.from_string(template)


def render(messages: list[dict], template: str | None, add_generation_prompt: bool = False) -> str:
    """The chat as text, ready for `Tokenizer.encode_special`."""
    if not template:
        raise UsageError("the tokenizer has no chat_template (tokenizer_config.json); --chat needs one")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UsageError(f"message {i}: expected {{role: system|user|assistant, content: text}}, got {m!r}")
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
