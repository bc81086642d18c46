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
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = render(messages, bpe.load(tok_dir).chat_template, add_generation_prompt=prompt)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def test_bad_messages_and_missing_template(tok_dir):
    template = bpe.load(tok_dir).chat_template
    with pytest.raises(UsageError, match="message 0"):
        render([{"role": "robot", "content": "x"}], template)
    with pytest.raises(UsageError, match="no chat_template"):
        render(CHATS[0], None)
