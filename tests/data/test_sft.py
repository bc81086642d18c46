"""SFT data: the three JSONL formats, masks on the assistant's tokens only, and packed rows whose per-document
losses equal each conversation scored alone."""

from __future__ import annotations

import json

import pytest

from mmctl.data import sft
from mmctl.errors import DataError
from mmctl.tokenizer import bpe

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "6"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    bpe.save(bpe.train(["What is 2 + 2? The answer is 4. Be brief."] * 50, vocab_size=300), d, 128)
    return bpe.load(d)


def test_the_three_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": CHAT},
        {"prompt": "Hi", "completion": "Hello!"},
        {"instruction": "Add.", "input": "2 + 2", "output": "4"},
        {"instruction": "Say hi.", "output": "hi"},
    ]) + "\n")
    convs = sft.read_conversations(path)
    assert convs[0] == CHAT
    assert convs[1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert convs[2][0]["content"] == "Add.\n\n2 + 2" and convs[3][0]["content"] == "Say hi."


@pytest.mark.parametrize("record, fragment", [
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] is not"),
    ({"messages": "hello"}, "field 'messages' is str"),
    ({"prompt": "x"}, "missing field 'completion'"),
    ({"instruction": "x", "output": 3}, "field 'output' is int"),
    ({"text": "x"}, "not a conversation"),
])
def test_malformed_lines_name_file_and_line(tmp_path, record, fragment):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        sft.read_conversations(path)
    assert "d.jsonl:2: " in str(e.value) and fragment in str(e.value) and e.value.exit_code == 3


def test_only_the_assistant_is_trained(tok):
    example = sft.encode(CHAT, tok)
    trained = [i for i, m in zip(example.ids, example.mask, strict=True) if m]
    assert tok.decode(trained) == "4<|end|>6<|end|>"
    assert all(sft.encode(CHAT, tok, train_on_prompt=True).mask)


def test_packed_rows_score_each_conversation_as_if_alone(tok):
    import torch

    from mmctl.models.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=2, max_position_embeddings=128)).eval()
    chats = [CHAT, CHAT[1:3], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Be brief."}]]
    examples = [sft.encode(c, tok) for c in chats]
    seq_len = sum(len(e.ids) for e in examples) + 3
    rows = sft.pack(examples, seq_len, tok.pad_id)
    assert len(rows.ids) == 1 and rows.cut == 0 and sum(rows.trained[0]) == sum(sum(e.mask[1:]) for e in examples)

    @torch.no_grad()
    def token_losses(ids, document_ids=None):
        ids = torch.tensor([ids])
        logits = model(ids[:, :-1], document_ids=None if document_ids is None else torch.tensor([document_ids]))
        return torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="none")

    packed = token_losses(rows.ids[0], rows.document_ids[0]) * torch.tensor(rows.trained[0])
    start = 0
    for e in examples:
        alone = (token_losses(e.ids) * torch.tensor(e.mask[1:])).sum()
        assert float(packed[start:start + len(e.ids) - 1].sum()) == pytest.approx(float(alone), rel=1e-5, abs=1e-6)
        assert packed[start + len(e.ids) - 1] == 0  # the last token never predicts the next conversation
        start += len(e.ids)


def test_rows_are_packed_best_fit_decreasing_and_long_conversations_are_cut(tok):
    examples = [sft.Example([1] * 5, [1] * 5), sft.Example([2] * 5, [1] * 5), sft.Example([3] * 20, [1] * 20)]
    rows = sft.pack(examples, seq_len=9, pad_id=0)
    assert rows.ids == [[3] * 10, [1] * 5 + [2] * 5] and rows.cut == 1 and rows.sources == [[2], [0, 1]]
    assert rows.document_ids[1] == [0] * 5 + [1] * 4 and rows.trained[1] == [1] * 4 + [0] + [1] * 4
    # in reading order 6 | 5 4 | 5 needs three rows of 10; longest first, tightest fit: 6 4 | 5 5
    lengths = [6, 5, 4, 5]
    rows = sft.pack([sft.Example([n] * n, [1] * n) for n in lengths], seq_len=9, pad_id=0)
    assert sorted(map(sorted, rows.sources)) == [[0, 2], [1, 3]] and all(0 not in r for r in rows.ids)
    padded = sft.pad(examples[:1], seq_len=7, pad_id=0)
    assert padded.ids == [[1] * 5 + [0] * 3] and padded.trained == [[1] * 4 + [0] * 3]


def test_builtin_sets_are_exact_and_never_hold_the_eval_problems():
    from mmctl.data.synthetic import held_out

    arithmetic = sft.builtin("arithmetic", 300, seed=0)
    for user, assistant in arithmetic:
        question = user["content"]
        assert not held_out(question)
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        *steps, last = assistant["content"].split(", ")  # "7+8=15, 4+3+1=8, so 85": each step true, the sum last
        assert int(last.removeprefix("so ")) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert steps and all(eval(step.split("=")[0]) == int(step.split("=")[1]) for step in steps)
    for user, assistant in sft.builtin("story-questions", 50, seed=0):
        story, question = user["content"].split("\n\nQuestion: ")
        assert assistant["content"] in story and question.endswith("?")
    with pytest.raises(DataError, match="unknown built-in"):
        sft.builtin("trivia", 1, 0)


def test_inspection_names_every_tokens_role_and_what_trains(tok):
    from mmctl.data import annotate

    system_chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2 + 2?"},
                   {"role": "assistant", "content": "4"}]
    chats = [system_chat, [{"role": "user", "content": "Name a fox"}, {"role": "assistant", "content": "Leo"}]]
    rows = sft.pack([sft.encode(c, tok) for c in chats], 64, tok.pad_id)
    assert rows.sources == [[0, 1]]
    tokens = annotate.annotate(rows, 0, chats, tok)
    assert "".join(t.text for t in tokens if t.role != "padding") == \
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello<|end|><|user|>What is 2 + 2?<|end|>" \
        "<|assistant|>4<|end|><|user|>Name a fox<|end|><|assistant|>Leo<|end|>"
    by_role = {}
    for t in tokens:
        by_role.setdefault((t.document, t.role), []).append(t.text)
    assert "".join(by_role[0, "system"]) == "<|system|>Be brief.<|end|>"
    assert "".join(by_role[1, "user"]) == "<|user|>Name a fox<|end|>"
    assert "".join(t.text for t in tokens if t.trained) == "Hello<|end|>4<|end|>Leo<|end|>"
    encoded = [sft.encode(c, tok) for c in chats]
    assert annotate.summary(tokens) == {"tokens": 65, "real": sum(len(e.ids) for e in encoded),
                                       "trained": sum(sum(e.mask) for e in encoded), "conversations": 2}
    plain = annotate.text(tokens, styled=False).plain
    assert "<|assistant|>⟦Hello<|end|>⟧" in plain and " │ <|user|>Name a fox" in plain and "<|pad|> × " in plain


def test_a_replayed_document_is_plain_text_with_every_token_trained(tok):
    from mmctl.data import annotate

    example = sft.encode("Once upon a time", tok)
    assert example.ids == tok.encode("Once upon a time") + [tok.eos_id] and set(example.mask) == {1}
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = sft.pack([example, sft.encode(chat, tok)], 64, tok.pad_id)
    tokens = annotate.annotate(rows, 0, ["Once upon a time", chat], tok)
    assert {t.role for t in tokens if t.document == rows.sources[0].index(0)} == {"text"}
