"""Chat rendering equals transformers' apply_chat_template for the same tokenizer directory."""

import pytest

from mmctl.data.chat import render
from mmctl.errors import UsageError
from mmctl.tokenizer import bpe

CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"}],
    [{"role": "user", "content": "multi\nline\n  text"}, {"role": "assistant", "content": " spaced "}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    bpe.save(bpe.train(["hello world"] * 50, vocab_size=300), d, 128)
    return d


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("prompt", [False, True])
def test_render_equals_transformers(tok_dir, messages, prompt):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = render(messages, bpe.load(tok_dir).chat_template, add_generation_prompt=prompt)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_bad_messages_and_missing_template(tok_dir):
    template = bpe.load(tok_dir).chat_template
    with pytest.raises(UsageError, match="message 0"):
        render([{"role": "robot", "content": "x"}], template)
    with pytest.raises(UsageError, match="no chat_template"):
        render(CHATS[0], None)


@pytest.mark.parametrize("messages", CHATS)
def test_ids_and_assistant_mask_equal_transformers(tok_dir, messages):
    """The assistant mask from the template's {% generation %} spans, as transformers computes it."""
    import transformers

    from mmctl.data.chat import tokenize
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    theirs = hf.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = tokenize(messages, bpe.load(tok_dir))
    assert ids == theirs["input_ids"]
    assert mask == theirs["assistant_masks"]
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assistant = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
    assert hf.decode(trained) == assistant  # the assistant's words and its end-of-turn token, nothing else


def test_broken_and_hostile_templates(tok_dir):
    from mmctl.errors import DataError, UnsafeInputError

    with pytest.raises(DataError, match="not a valid Jinja template"):
        render(CHATS[0], "{% for %}")
    with pytest.raises(UnsafeInputError, match="sandbox"):
        render(CHATS[0], "{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(DataError, match="failed to render"):
        render(CHATS[0], "{{ raise_exception('no') if true }}{{ 1 / 0 }}")
    with pytest.raises(DataError, match="reserved"):
        render([{"role": "user", "content": "\ue000"}], bpe.load(tok_dir).chat_template)
