"""The hostile checkpoint corpus: each case mutates a copy of a valid checkpoint dir, then `mmctl generate` and
`mmctl eval` (and `mmctl account`, for config cases) must end in the expected exit code with one error line naming
a file of the dir — no traceback, no hang, no runaway memory, nothing read outside the dir.

A case is (name, mutate(dir, outside), expected exit code); `outside` is a scratch directory beside the checkpoint
(for symlinks pointing out of it).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


def _edit_json(name: str, **changes):
    def mutate(d: Path, outside: Path) -> None:
        data = json.loads((d / name).read_text())
        for key, value in changes.items():
            if value is DELETE:
                data.pop(key, None)
            else:
                data[key] = value
        (d / name).write_text(json.dumps(data))

    return mutate


def _write(name: str, content: bytes | str):
    def mutate(d: Path, outside: Path) -> None:
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return mutate


def _remove(name: str):
    def mutate(d: Path, outside: Path) -> None:
        (d / name).unlink()

    return mutate


def _fifo(name: str):
    def mutate(d: Path, outside: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)

    return mutate


def _directory(name: str):
    def mutate(d: Path, outside: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()

    return mutate


def _symlink_out(name: str):
    def mutate(d: Path, outside: Path) -> None:
        target = outside / f"moved-{name}"
        os.replace(d / name, target)
        (d / name).symlink_to(target)

    return mutate


def _tensors(edit):
    """Rewrite model.safetensors through `edit(tensors) -> tensors`."""

    def mutate(d: Path, outside: Path) -> None:
        from safetensors.torch import load_file, save_file

        save_file(edit(load_file(d / "model.safetensors")), d / "model.safetensors")

    return mutate


def _truncate(fraction: float):
    def mutate(d: Path, outside: Path) -> None:
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: int(len(data) * fraction)])

    return mutate


def _header(header: bytes, length: int | None = None):
    """model.safetensors with a crafted header (and its stated length)."""

    def mutate(d: Path, outside: Path) -> None:
        n = len(header) if length is None else length
        (d / "model.safetensors").write_bytes(struct.pack("<Q", n) + header)

    return mutate


def _sharded(weight_map):
    """model.safetensors replaced by an index whose weight_map is `weight_map(names)`."""

    def mutate(d: Path, outside: Path) -> None:
        from safetensors.torch import load_file

        names = list(load_file(d / "model.safetensors"))
        os.replace(d / "model.safetensors", d / "shard-1.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map(names)}))

    return mutate


def _pickle_only(d: Path, outside: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'touch CANARY'\ntR.")


def _chat_template(template: str):
    return _edit_json("tokenizer_config.json", chat_template=template)


DELETE = object()
CONFIG = "config.json"
TOKCFG = "tokenizer_config.json"
GENCFG = "generation_config.json"

CONFIG_VALUES = {  # config.json field → bad values (each one case)
    "hidden_size": [-64, 0, "64", True, [64], None, 64.5, 10**12],
    "num_hidden_layers": [-1, 0, "2", False, 100_000, 10_000_000],
    "num_attention_heads": [0, 3, "4", -4],
    "num_key_value_heads": [3, 0, "2"],
    "intermediate_size": [0, -128, "128", [128]],
    "vocab_size": [0, -1, "512", 10**9],
    "max_position_embeddings": [0, -64, "64"],
    "rope_theta": ["abc", -1.0, 0, float("nan")],
    "rms_norm_eps": [float("nan"), -1e-5, "1e-5"],
    "rope_scaling": [[1, 2], "llama3", {"rope_type": "yarn", "factor": 4.0}, {"rope_type": "llama3"}],
    "head_dim": [7, 0, "16"],
    "model_type": ["gpt2", 7, None],
    "tie_word_embeddings": ["yes"],
    "hidden_act": ["relu"],
    "sliding_window": [-1, "x"],
}


def cases() -> list[tuple[str, object, int]]:
    out: list[tuple[str, object, int]] = []
    for key, values in CONFIG_VALUES.items():
        for value in values:
            code = 3  # a checkpoint is data: an unsupported model or rope type is bad data, as a corrupt weight file is
            extra = {"model_type": "mistral"} if key == "sliding_window" else {}
            out.append((f"config:{key}={value!r}", _edit_json(CONFIG, **{key: value}, **extra), code))
    for key in ("hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        out.append((f"config:missing-{key}", _edit_json(CONFIG, **{key: DELETE}), 3))
    out += [
        ("config:not-json", _write(CONFIG, "{oops"), 3),
        ("config:list", _write(CONFIG, "[1, 2]"), 3),
        ("config:empty", _write(CONFIG, ""), 3),
        ("config:binary", _write(CONFIG, b"\xff\xfe\x00\x01"), 3),
        ("config:missing", _remove(CONFIG), 3),
        ("config:fifo", _fifo(CONFIG), 3),
        ("config:directory", _directory(CONFIG), 3),
        ("config:deep", _write(CONFIG, "[" * 100_000 + "]" * 100_000), 3),
        ("weights:truncated-half", _truncate(0.5), 3),
        ("weights:truncated-header", _truncate(0.0001), 3),
        ("weights:empty", _write("model.safetensors", b""), 3),
        ("weights:garbage", _write("model.safetensors", b"\x00garbage" * 64), 3),
        ("weights:huge-header-length", _header(b"{}", length=2**62), 3),
        ("weights:header-not-json", _header(b"{not json" + b" " * 7), 3),
        ("weights:offsets-past-end", _header(json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000],
                                                                "data_offsets": [0, 4_000_000]}}).encode()), 3),
        ("weights:missing", _remove("model.safetensors"), 3),
        ("weights:fifo", _fifo("model.safetensors"), 3),
        ("weights:symlink-outside", _symlink_out("model.safetensors"), 4),
        ("weights:pickle-only", _pickle_only, 4),
        ("weights:missing-tensor", _tensors(lambda t: {k: v for k, v in t.items() if "layers.1.mlp" not in k}), 3),
        ("weights:extra-tensor", _tensors(lambda t: {**t, "evil.weight": t["model.norm.weight"].clone()}), 3),
        ("weights:wrong-shape", _tensors(lambda t: {**t, "model.norm.weight": t["model.norm.weight"][:-1]}), 3),
        ("weights:int-where-float", _tensors(lambda t: {**t, "model.norm.weight":
                                                        t["model.norm.weight"].to(__import__("torch").int8)}), 3),
        ("index:parent-path", _sharded(lambda names: {n: "../shard-1.safetensors" for n in names}), 4),
        ("index:absolute-path", _sharded(lambda names: {n: "/etc/passwd" for n in names}), 4),
        ("index:missing-shard", _sharded(lambda names: {n: "shard-2.safetensors" for n in names}), 3),
        ("index:not-a-map", _sharded(lambda names: [1, 2]), 3),
        ("index:non-string-file", _sharded(lambda names: {n: 7 for n in names}), 3),
        ("index:missing-names", _sharded(lambda names: {names[0]: "shard-1.safetensors"}), 3),
        ("tokenizer:missing", _remove("tokenizer.json"), 3),
        ("tokenizer:garbage", _write("tokenizer.json", "{oops"), 3),
        ("tokenizer:fifo", _fifo("tokenizer.json"), 3),
        ("tokenizer:larger-than-model", _edit_json(CONFIG, vocab_size=256), 3),
        ("tokenizer_config:list", _write(TOKCFG, "[1]"), 3),
        ("tokenizer_config:not-json", _write(TOKCFG, "{oops"), 3),
        ("tokenizer_config:eos-int", _edit_json(TOKCFG, eos_token=123), 3),
        ("tokenizer_config:eos-unknown", _edit_json(TOKCFG, eos_token="<|nothing|>"), 3),
        ("generation_config:eos-string", _edit_json(GENCFG, eos_token_id="abc"), 3),
        ("generation_config:eos-list-of-strings", _edit_json(GENCFG, eos_token_id=["a"]), 3),
        ("generation_config:list", _write(GENCFG, "[1]"), 3),
        ("generation_config:not-json", _write(GENCFG, "{oops"), 3),
    ]
    return out


CHAT_CASES = [  # --chat: the template is rendered (sandboxed)
    ("template:globals", _chat_template("{{ cycler.__init__.__globals__.os.system('touch CANARY') }}"), 4),
    ("template:mro", _chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}"), 4),
    ("template:lipsum", _chat_template("{{ lipsum.__globals__['os'].system('touch CANARY') }}"), 4),
    ("template:raises", _chat_template("{{ raise_exception('no') }}"), 3),
    ("template:syntax", _chat_template("{% for m in messages %}"), 3),
    ("template:recursion", _chat_template("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"), 3),
    ("template:huge", _chat_template("{% for i in range(100000) %}{% for j in range(1000) %}x{% endfor %}"
                                     "{% endfor %}"), 3),
    ("template:not-string", _edit_json(TOKCFG, chat_template=[1, 2]), 3),
]
