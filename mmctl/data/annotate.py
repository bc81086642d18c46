"""What a fine-tuning row holds, token by token: which conversation and role each token comes from, and whether
the loss trains the model to predict it — what `mmctl sft --inspect` shows before any training.

A row of seq_len + 1 tokens gives seq_len (input, target) pairs; `Rows.trained[j]` says whether target
ids[j + 1] counts in the loss, so here a token is "trained" when the model learns to predict *it*.
"""

from __future__ import annotations

from dataclasses import dataclass

STYLES = {"system": "magenta", "user": "cyan", "assistant": "green", "text": "yellow", "padding": "bright_black"}


@dataclass
class Token:
    text: str
    role: str  # the message's role, "text" (a plain document replayed), or "padding"
    trained: bool
    document: int  # which conversation of the row (packing), from 0


def annotate(rows, i: int, items: list, tok) -> list[Token]:
    """Row `i` of `rows` (made from `items` — conversations, or plain documents — by data.sft.pack or pad) as
    annotated tokens."""
    from mmctl.data.chat import roles
    from mmctl.data.sft import encode

    role_of = []
    for document, c in enumerate(rows.sources[i]):
        item = items[c]
        kinds = ["text"] * len(encode(item, tok).ids) if isinstance(item, str) else roles(item, tok)
        role_of += [(r, document) for r in kinds]
    ids = rows.ids[i]
    padding = ("padding", len(rows.sources[i]))
    role_of = (role_of + [padding] * len(ids))[: len(ids)]
    return [Token(tok.decode([t]), role, j > 0 and bool(rows.trained[i][j - 1]), document)
            for j, (t, (role, document)) in enumerate(zip(ids, role_of, strict=True))]


def summary(tokens: list[Token]) -> dict:
    real = [t for t in tokens if t.role != "padding"]
    return {"tokens": len(tokens), "real": len(real), "trained": sum(t.trained for t in tokens),
            "conversations": len({t.document for t in real})}


def text(tokens: list[Token], styled: bool):
    """A rich Text of the row: colour = role, bold underlined = trained, a dim │ between conversations, a run of
    padding as one "<|pad|> × n". Unstyled (off a terminal), trained runs are wrapped in ⟦ ⟧ instead."""
    from rich.text import Text

    out = Text()
    previous, in_trained = None, False
    pads = [t for t in tokens if t.role == "padding"]
    for t in tokens:
        if t.role == "padding":
            break
        if previous is not None and t.document != previous.document:
            if in_trained and not styled:
                out.append("⟧")
                in_trained = False
            out.append(" │ ", style="bright_black")
        if not styled and t.trained != in_trained:
            out.append("⟦" if t.trained else "⟧")
            in_trained = t.trained
        shown = t.text.replace("\n", "↵\n")
        out.append(shown, style=STYLES.get(t.role, "") + (" bold underline" if t.trained else "") if styled else "")
        previous = t
    if in_trained:
        out.append("⟧")
    if pads:
        out.append(f" {pads[0].text} × {len(pads)}", style=STYLES["padding"])
    return out
