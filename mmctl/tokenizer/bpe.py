"""Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant, Radford et al. 2019) with HF `tokenizers`.

Training: text is split by a regex pre-tokenizer (GPT-2's, or Llama-3 / GPT-4's, which keeps numbers to at most
three digits and is the default), each piece is mapped to bytes shown as printable characters, and BPE learns
merges up to `vocab_size` over the 256 byte symbols. Every string round-trips exactly, whatever its script or
whitespace. The reserved special tokens of DESIGN §5 take the first ids.

A tokenizer directory holds `tokenizer.json` (the HF tokenizers file) and `tokenizer_config.json` (special
tokens and the chat template), so `transformers.AutoTokenizer.from_pretrained(dir)` loads it offline. `load()`
also reads a Hugging Face tokenizer directory a user has locally (its own special tokens are used).

Leaves out: training BPE in Python (CS336 assignment 1 does that; this uses the Rust trainer for speed),
sentencepiece / unigram models, normalization (none is applied: bytes in, bytes out).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mmctl.artifacts import regular_file
from mmctl.errors import DataError

BOS, EOS, PAD, IMAGE = "<|bos|>", "<|eos|>", "<|pad|>", "<|image|>"
# The files of a tokenizer directory (mmctl writes the first two; Hugging Face ones may have the others).
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
END = "<|end|>"  # closes every chat turn
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", END, IMAGE]

PATTERNS = {
    # GPT-2 (Radford et al. 2019): contractions, letters, digits, punctuation, whitespace.
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # Llama-3 / GPT-4 (cl100k): case-insensitive contractions, numbers split into groups of at most 3 digits.
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # The same with every digit its own token, as Llama 2's and SmolLM's tokenizers do: "87" is "8" "7", so a
    # small model learns arithmetic digit by digit, from tables of ten by ten, instead of one token per number.
    "llama3-digits": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

# Each turn is <|role|>content<|end|>; the assistant's turn (content and <|end|>) is what SFT trains on, marked
# with {% generation %} so transformers' return_assistant_tokens_mask (and TRL's assistant_only_loss) see it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character that stands for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # bytes without a printable look-alike are shifted past 255
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_OF_CHAR = _byte_alphabet()


def train(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, pattern: str = "llama3",
          length: int | None = None):
    """Learn a byte-level BPE tokenizer (a `tokenizers.Tokenizer`) from an iterable of documents."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def save(tok, directory: str | Path, model_max_length: int) -> Path:
    """Write tokenizer.json + tokenizer_config.json into `directory` (which must not be published yet)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[3:],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return directory


@dataclass
class Tokenizer:
    """A loaded tokenizer directory: encode / decode, special token ids, identity (sha256)."""

    path: Path
    backend: object  # tokenizers.Tokenizer
    config: dict

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def _special(self, key: str) -> int | None:
        value = self.config.get(key)
        if isinstance(value, dict):  # older tokenizer_config files store {"content": "<s>", ...}
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise DataError(f"{self.path}: {key} must be a token string, got {value!r}")
        return self.token_id(value) if value else None

    @cached_property
    def eos_id(self) -> int:
        eos = self._special("eos_token")
        if eos is None:
            raise DataError(f"{self.path}: the tokenizer has no eos_token, needed to separate documents")
        return eos

    @cached_property
    def bos_id(self) -> int | None:
        return self._special("bos_token")

    @cached_property
    def pad_id(self) -> int | None:
        return self._special("pad_token")

    def special_token_ids(self) -> dict[str, int]:
        """{"bos_token_id": …, "eos_token_id": …, "pad_token_id": …} for the roles the tokenizer names (what a
        checkpoint's config.json and generation_config.json record)."""
        ids = {"bos": self.bos_id, "eos": self._special("eos_token"), "pad": self.pad_id}
        return {f"{role}_token_id": i for role, i in ids.items() if i is not None}

    def files(self) -> list[Path]:
        """The files of this tokenizer directory, to copy into a checkpoint dir."""
        return [self.path / n for n in FILES if (self.path / n).is_file()]

    @cached_property
    def sha256(self) -> str:
        """The identity shards and checkpoints record: the sha256 of tokenizer.json."""
        with open(self.path / "tokenizer.json", "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it are encoded as ordinary text.

        Corpus text that happens to contain "<|eos|>" must not end a document, nor can a user's prompt forge a
        role turn; special tokens enter only where mmctl puts them (`encode_with_offsets(…, special=True)`).
        """
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str, special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode`, with each token's (start, end) character offsets into `text`; `special`: special-token
        strings are recognized — only for text mmctl itself rendered around a message (data/chat.py), never for
        a message's content."""
        self.backend.encode_special_tokens = not special
        try:
            encoding = self.backend.encode(text, add_special_tokens=False)
        finally:
            self.backend.encode_special_tokens = True
        return encoding.ids, encoding.offsets

    def encode_batch(self, texts: list[str], dtype=np.uint32) -> list[np.ndarray]:
        """Encode many documents at once (parallel in the Rust backend), as arrays."""
        return [np.asarray(e.ids, dtype=dtype) for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; b"" for special tokens. (Decoding one token alone would turn a piece of a
        multi-byte character into U+FFFD, so the byte-level alphabet is inverted instead.)"""
        if token_id in self._special_ids:
            return b""
        piece = self.backend.id_to_token(token_id)
        try:
            return bytes(BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # not a byte-level vocabulary (e.g. a SentencePiece one): its pieces are text
            return self.decode([token_id]).encode("utf-8")


def load(directory: str | Path) -> Tokenizer:
    """Load a tokenizer directory (mmctl's or a local Hugging Face one holding tokenizer.json)."""
    from tokenizers import Tokenizer as Backend

    directory = Path(directory)
    file = directory / "tokenizer.json"
    if not file.exists():
        raise DataError(f"{directory}: no tokenizer.json (a tokenizer directory needs one)")
    regular_file(file)  # a FIFO would block the reader forever
    try:
        backend = Backend.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for malformed files
        raise DataError(f"{file}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        file = directory / name
        try:
            data = json.loads(regular_file(file).read_text(encoding="utf-8")) if file.exists() else {}
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise DataError(f"{file}: not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise DataError(f"{file}: expected a JSON object")
        config.update(data)
    template = directory / "chat_template.jinja"  # where transformers ≥ 4.50 saves a chat template
    if not config.get("chat_template") and template.exists():
        try:
            config["chat_template"] = regular_file(template).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{template}: not UTF-8 text (byte {e.start})") from None
    backend.encode_special_tokens = True
    return Tokenizer(directory, backend, config)


def longest_tokens(tok: Tokenizer, n: int = 10) -> list[str]:
    """The `n` tokens that stand for the most bytes (a glimpse of what BPE learned)."""
    ranked = sorted(range(tok.vocab_size), key=lambda i: (-len(tok.token_bytes(i)), i))
    return [tok.token_bytes(i).decode("utf-8", errors="replace") for i in ranked[:n]]
