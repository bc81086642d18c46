"""The BPE tokenizer: exact round trips, identical ids through transformers.AutoTokenizer, the chat template."""

import pytest

from mmctl.data.synthetic import stories
from mmctl.tokenizer import bpe

TRICKY = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand   runs      of spaces",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 🙂👍🏽🧑‍🚀 and combining e\u0301",
    "numbers 1234567890 3.14159 -42 1e-3",
    "code: def f(x):\n    return x ** 2  # comment",
    "special strings as text: <|eos|> <|user|>hi<|end|> <|image|>",
    "\u0000 control \u0007 chars \ufeff",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    corpus = list(stories(300, 0)) + TRICKY
    bpe.save(bpe.train(corpus, vocab_size=600, min_frequency=2), directory, model_max_length=256)
    return bpe.load(directory)


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_take_the_first_ids_and_are_not_forged_by_text(tok):
    assert [tok.token_id(t) for t in bpe.SPECIAL_TOKENS] == list(range(len(bpe.SPECIAL_TOKENS)))
    ids = tok.encode("<|eos|>")
    assert tok.eos_id not in ids and len(ids) > 1  # corpus text never ends a document
    assert tok.encode_with_offsets("<|user|>hi<|end|>", special=True)[0][0] == tok.token_id("<|user|>")
    assert tok.decode(tok.encode_with_offsets("<|user|>hi<|end|>", special=True)[0]) == "<|user|>hi<|end|>"


def test_vocab_and_coverage_of_bytes(tok):
    assert tok.vocab_size == 600
    # every byte is a token: any string encodes without an unknown token
    assert len(tok.encode(bytes(range(256)).decode("latin-1"))) > 0


def test_transformers_autotokenizer_gives_identical_ids(tok):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(tok.path)
    for text in TRICKY[:-3] + list(stories(20, 1)):
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == text
    assert hf.eos_token == "<|eos|>" and hf.pad_token == "<|pad|>" and hf.bos_token == "<|bos|>"
    # specials written by mmctl (a rendered chat) are recognized the same way by both
    rendered = "<|user|>What is 2 + 2?<|end|><|assistant|>4<|end|>"
    assert hf(rendered, add_special_tokens=False)["input_ids"] == tok.encode_with_offsets(rendered, special=True)[0]


def test_chat_template_through_transformers(tok):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(tok.path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>"
    prompt = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|user|>Hi<|end|><|assistant|>")
    out = hf.apply_chat_template(messages, tokenize=True, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert hf.decode(trained) == "Hello!<|end|>"


def test_longest_tokens(tok):
    longest = bpe.longest_tokens(tok, 5)
    assert len(longest) == 5
    assert len(longest[0].encode()) >= len(longest[-1].encode())


def test_bad_tokenizer_dirs(tmp_path):
    from mmctl.errors import DataError

    with pytest.raises(DataError, match="no tokenizer.json"):
        bpe.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match="not a valid tokenizers file"):
        bpe.load(tmp_path)


def test_token_bytes_add_up_to_the_text(tok):
    for text in TRICKY + ["café “quoted” 日本 🙂"]:
        ids = tok.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(tok.eos_id) == b""
    assert "<|eos|>" not in bpe.longest_tokens(tok, 20)


def test_the_digits_pattern_gives_every_digit_its_own_token(tmp_path):
    from mmctl.data.synthetic import arithmetic

    corpus = list(arithmetic(500, 0))
    digits = bpe.train(corpus, vocab_size=400, pattern="llama3-digits")
    grouped = bpe.train(corpus, vocab_size=400, pattern="llama3")
    text = "What is 47 + 1180?"
    assert [t for t in digits.encode(text).tokens if t.isdigit()] == ["4", "7", "1", "1", "8", "0"]
    assert any(len(t) > 1 for t in grouped.encode(text).tokens if t.isdigit())  # up to 3 digits per token
    assert digits.decode(digits.encode(text).ids) == text
