"""The hostile input corpus of the stages added after the first suite — chat data, preference pairs, problems,
reward code, images, datasets dirs, quantized / VLM / draft checkpoint dirs, report inputs and absurd recipe values
— as data. Every case must end in its exit code with `error:` lines only, the first naming the input (a file, a
field, a dir): no traceback, no hang, no runaway memory, nothing executed that the recipe did not opt into.

A case is `Case(name, files, argv, code, names)`. `files` maps a path inside the case's directory to its content
(str or bytes), or to FIFO, DIR, or `Link(target)`; `{d}` in any text is the case's directory, `{base}` a small
language model, `{vlm}` a small VLM, `{quant}` an rtn 4-bit copy of the base, `{nf4}` / `{int8}` bitsandbytes
copies, `{runs}` a directory of finished runs for the report. `names` must appear in the first error line.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

FIFO, DIR = "<fifo>", "<dir>"


@dataclass(frozen=True)
class Link:
    target: str


@dataclass
class Case:
    name: str
    files: dict = field(default_factory=dict)
    argv: list = field(default_factory=list)
    code: int = 3
    names: str = ""


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def yaml(recipe: dict) -> str:
    return json.dumps(recipe)  # JSON is YAML


def png(width: int, height: int, data: bytes | None = None) -> bytes:
    """A PNG whose header says width × height (its pixels: `data`, else a single empty IDAT)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data or b""))
            + chunk(b"IEND", b""))


def good_png() -> bytes:
    return png(2, 2, b"\x00" + b"\xff\x00\x00" * 2 + b"\x00" + b"\x00\xff\x00" * 2)


TRAIN = {"steps": 1, "batch_size": 2, "seq_len": 64, "precision": "fp32"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def sft(data: str | dict, kind: str = "jsonl", **extra) -> dict:
    source = {"kind": kind, "path": "{d}/" + data} if isinstance(data, str) else data
    return {"stage": "sft", "run": {"out": "{d}/out", "device": "cpu"}, "base": "{base}",
            "data": {"sources": [source], "val_fraction": 0}, "train": TRAIN, **extra}


def chat_data_cases() -> list[Case]:
    bad = {
        "not-json": "{oops", "array": "[1, 2]", "messages-str": {"messages": "hi"},
        "role-wizard": {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "content-int": {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]},
        "content-null": {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
        "content-parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                                       {"role": "assistant", "content": "y"}]},
        "message-not-object": {"messages": ["user: hi", {"role": "assistant", "content": "y"}]},
        "no-assistant": {"messages": [{"role": "user", "content": "x"}]},
        "empty-messages": {"messages": []},
        "surrogate": '{"messages": [{"role": "user", "content": "a\\ud800b"}, {"role": "assistant", "content": "y"}]}',
        "surrogate-in-answer": '{"prompt": "x", "completion": "\\udfff"}',
        "completion-int": {"prompt": "x", "completion": 5},
        "alpaca-no-output": {"instruction": "x"},
        "neither-format": {"text": "x"},
        "deep-nesting": "[" * 200_000 + "]" * 200_000,
        "reserved-code-point": {"messages": [{"role": "user", "content": "\ue001"}, {"role": "assistant",
                                                                                     "content": "y"}]},
    }
    cases = [Case(f"sft-data:{name}", {"c.jsonl": jsonl(CHAT, record)}, ["sft", "{d}/r.yaml"], 3, "c.jsonl:2")
             for name, record in bad.items()]
    raw = {"empty-file": ("", "no conversations"), "blank-lines": ("\n\n  \n", "no conversations"),
           "not-utf8": (b'{"messages": "\xff"}\n', "c.jsonl:1"), "utf16": (jsonl(CHAT).encode("utf-16"), "c.jsonl:1"),
           "fifo": (FIFO, "not a regular file"), "directory": (DIR, "not a regular file"),
           "dev-zero": (Link("/dev/zero"), "not a regular file"), "missing": (None, "c.jsonl")}
    for name, (content, names) in raw.items():
        files = {} if content is None else {"c.jsonl": content}
        cases.append(Case(f"sft-data:{name}", files, ["sft", "{d}/r.yaml"], 3, names))
    for case in cases:
        case.files["r.yaml"] = yaml(sft("c.jsonl"))
    return cases


def datasets_cases() -> list[Case]:
    """A datasets save_to_disk dir, damaged: `{ds}` is a good one copied into the case as `ds/`."""
    cases = [
        ("empty-dir", {"ds": DIR}),
        ("garbage-state", {"ds": "<copy>", "ds/train/state.json": "{garbage"}),
        ("garbage-info", {"ds": "<copy>", "ds/train/dataset_info.json": "[1, 2"}),
        ("garbage-dict", {"ds": "<copy>", "ds/dataset_dict.json": "not json"}),
        ("truncated-arrow", {"ds": "<copy>", "ds/train/data-00000-of-00001.arrow": b"ARROW1\x00\x00\xff\xff"}),
        ("arrow-is-text", {"ds": "<copy>", "ds/train/data-00000-of-00001.arrow": Link("{d}/text.txt"),
                           "text.txt": "hello, not arrow"}),
        ("missing-state", {"ds": "<copy>", "ds/train/state.json": None}),
        ("a-file", {"ds": "just a file"}),
    ]
    out = []
    for name, files in cases:
        out.append(Case(f"datasets:{name}", {**files, "r.yaml": yaml(sft("ds", kind="datasets"))},
                        ["sft", "{d}/r.yaml"], 3, "ds"))
    out.append(Case("datasets:no-split", {"ds": "<copy>", "r.yaml": yaml(sft({"kind": "datasets", "path": "{d}/ds",
                                                                              "split": "test"}))},
                    ["sft", "{d}/r.yaml"], 3, "no split 'test'"))
    return out


def dpo(path: str = "p.jsonl", seq_len: int = 64) -> dict:
    return {"stage": "rl", "algorithm": "dpo", "run": {"out": "{d}/out", "device": "cpu"}, "base": "{base}",
            "data": {"sources": [{"kind": "jsonl", "path": "{d}/" + path}], "val_fraction": 0},
            "train": {**TRAIN, "seq_len": seq_len}}


def grpo(path: str = "q.jsonl", **g) -> dict:
    return {"stage": "rl", "algorithm": "grpo", "run": {"out": "{d}/out", "device": "cpu"}, "base": "{base}",
            "grpo": {"group_size": 2, "max_completion_tokens": 2, **g},
            "data": {"sources": [{"kind": "jsonl", "path": "{d}/" + path}], "val_fraction": 0},
            "train": TRAIN}


PAIR = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
PROBLEM = {"prompt": "What is 2 + 2?", "answer": 4}


def rl_data_cases() -> list[Case]:
    pairs = {
        "no-rejected": {"prompt": "x", "chosen": "y"}, "chosen-int": {"prompt": "x", "chosen": 4, "rejected": "5"},
        "chosen-two-messages": {"prompt": "x", "chosen": [{"role": "assistant", "content": "a"},
                                                          {"role": "assistant", "content": "b"}], "rejected": "5"},
        "prompt-empty-list": {"prompt": [], "chosen": "4", "rejected": "5"},
        "prompt-ends-with-assistant": {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "4",
                                       "rejected": "5"},
        "surrogate": '{"prompt": "x", "chosen": "\\ud83d", "rejected": "5"}',
        "not-object": "7",
    }
    problems = {
        "no-answer": {"prompt": "x"}, "answer-bool": {"prompt": "x", "answer": True},
        "answer-only-hashes": {"question": "x", "answer": "steps ####"}, "answer-list": {"prompt": "x", "answer": [4]},
        "question-int": {"question": 7, "answer": 4}, "surrogate": '{"prompt": "\\udc80", "answer": 1}',
        "not-object": "null",
    }
    cases = [Case(f"dpo-data:{n}", {"p.jsonl": jsonl(PAIR, r), "r.yaml": yaml(dpo())}, ["rl", "{d}/r.yaml"], 3,
                  "p.jsonl:2") for n, r in pairs.items()]
    cases += [Case(f"grpo-data:{n}", {"q.jsonl": jsonl(PROBLEM, r), "r.yaml": yaml(grpo())}, ["rl", "{d}/r.yaml"],
                   3, "q.jsonl:2") for n, r in problems.items()]
    cases += [
        Case("dpo-data:empty", {"p.jsonl": "", "r.yaml": yaml(dpo())}, ["rl", "{d}/r.yaml"], 3, "p.jsonl"),
        Case("grpo-data:empty", {"q.jsonl": "\n", "r.yaml": yaml(grpo())}, ["rl", "{d}/r.yaml"], 3, "q.jsonl"),
        Case("dpo-data:completion-past-seq-len", {"p.jsonl": jsonl({**PAIR, "prompt": "word " * 400}),
                                                  "r.yaml": yaml(dpo(seq_len=32))},
             ["rl", "{d}/r.yaml"], 2, "train.seq_len"),
        Case("grpo-data:prompt-past-seq-len", {"q.jsonl": jsonl({**PROBLEM, "prompt": "word " * 400}),
                                               "r.yaml": yaml(grpo())}, ["rl", "{d}/r.yaml"], 2, "train.seq_len"),
    ]
    return cases


REWARD_MODULES = {
    "raises_on_import.py": "raise RuntimeError('no import for you')\n",
    "syntax_error.py": "def f(:\n",
    "rewards_here.py": ("import math, sys, time\nCONSTANT = 3\n"
                        "def huge(c, a):\n    return 10 ** 400\n"
                        "def nan(c, a):\n    return math.nan\n"
                        "def text(c, a):\n    return 'yes'\n"
                        "def raises(c, a):\n    raise ValueError('bad reward')\n"
                        "def exits(c, a):\n    sys.exit(0)\n"
                        "def forever(c, a):\n    while True:\n        time.sleep(0.01)\n"
                        "def no_args():\n    return 1.0\n"),
}


def reward_cases() -> list[Case]:
    not_names = [".rel:f", "../up:f", ":f", "mod:", "a b:f", "/abs/path:f"]  # no module:function of Python names
    cases = [Case(f"reward:{name!r}", {"q.jsonl": jsonl(PROBLEM), "r.yaml": yaml(grpo(
        allow_python_rewards=True, rewards=[{"name": name}]))}, ["rl", "{d}/r.yaml"], 2, "grpo.rewards[0].name")
        for name in not_names]
    runtime = {"raises_on_import:f": (2, "raises_on_import"), "syntax_error:f": (2, "syntax_error"),
               "no_such_module:f": (2, "no_such_module"), "rewards_here:CONSTANT": (2, "not a function"),
               "rewards_here:missing": (2, "rewards_here:missing"), "rewards_here:huge": (3, "rewards_here:huge"),
               "rewards_here:nan": (3, "rewards_here:nan"), "rewards_here:text": (3, "rewards_here:text"),
               "rewards_here:raises": (3, "bad reward"), "rewards_here:exits": (3, "rewards_here:exits"),
               "rewards_here:forever": (3, "reward_seconds"), "rewards_here:no_args": (3, "rewards_here:no_args")}
    for name, (code, names) in runtime.items():
        cases.append(Case(f"reward:{name}", {**REWARD_MODULES, "q.jsonl": jsonl(PROBLEM), "r.yaml": yaml(grpo(
            allow_python_rewards=True, reward_seconds=1, rewards=[{"name": name}]))}, ["rl", "{d}/r.yaml"], code,
            names))
    cases.append(Case("reward:not-allowed", {**REWARD_MODULES, "q.jsonl": jsonl(PROBLEM), "r.yaml": yaml(grpo(
        rewards=[{"name": "rewards_here:nan"}]))}, ["rl", "{d}/r.yaml"], 2, "allow_python_rewards"))
    return cases


def vision(data: str = "v.jsonl", kind: str = "jsonl") -> dict:
    return {"stage": "align-vision", "run": {"out": "{d}/out", "device": "cpu"}, "base": "{base}",
            "vision": {"encoder": {"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
                                   "num_layers": 1, "num_heads": 2}},
            "phases": [{"name": "a", "sources": [{"kind": kind, "path": "{d}/" + data}], "val_fraction": 0,
                        "train": {"steps": 1, "batch_size": 1, "seq_len": 64, "precision": "fp32"}}],
            "eval": {"items": 6, "composition_items": 0}}


def image_cases() -> list[Case]:
    q = {"question": "What colour?", "answer": "red"}
    files = {
        "missing": {}, "text-file": {"x.png": "not an image"}, "truncated": {"x.png": good_png()[:30]},
        "fifo": {"x.png": FIFO}, "directory": {"x.png": DIR}, "dev-zero": {"x.png": Link("/dev/zero")},
        "bomb": {"x.png": png(30000, 30000)}, "zero-width": {"x.png": png(0, 4)},
    }
    cases = [Case(f"image:{name}", {**f, "v.jsonl": jsonl({"image": "x.png", **q}), "r.yaml": yaml(vision())},
                  ["align-vision", "{d}/r.yaml"], 3, "x.png") for name, f in files.items()]
    records = {"image-int": {"image": 5, **q}, "image-empty": {"image": "", **q},
               "image-nul": {"image": "x\u0000.png", **q}, "no-question": {"image": "ok.png", "answer": "red"},
               "answers-not-text": {"image": "ok.png", "question": "x", "answers": [{"answer": [1]}]},
               "caption-int": {"image": "ok.png", "caption": 3},
               "question-surrogate": '{"image": "ok.png", "question": "\\ud800", "answer": "red"}'}
    cases += [Case(f"image-record:{name}", {"ok.png": good_png(), "v.jsonl": jsonl(r), "r.yaml": yaml(vision())},
                   ["align-vision", "{d}/r.yaml"], 3, "v.jsonl:1") for name, r in records.items()]
    for name, image in {"fifo": FIFO, "text": "text", "bomb": png(30000, 30000), "dir": DIR}.items():
        cases.append(Case(f"generate-image:{name}", {"x.png": image},
                          ["generate", "{vlm}", "-p", "What?", "--image", "{d}/x.png", "--max-new-tokens", "1"], 3,
                          "x.png"))
        cases.append(Case(f"eval-vqa:{name}", {"x.png": image, "t.jsonl": jsonl({"image": "x.png", **q})},
                          ["eval", "{vlm}", "--task", "vqa", "--data", "{d}/t.jsonl", "--out", "{d}/out"], 3,
                          "x.png"))
    cases.append(Case("datasets-image:bytes-as-text", {"ds": "<image-bytes-str>", "r.yaml": yaml(
        vision("ds", kind="datasets"))}, ["align-vision", "{d}/r.yaml"], 3, "image"))
    cases.append(Case("datasets-image:bomb", {"ds": "<image-bomb>", "r.yaml": yaml(vision("ds", kind="datasets"))},
                      ["align-vision", "{d}/r.yaml"], 3, "decompression bomb"))
    return cases


def edit(config: str = "config.json", **changes) -> dict:
    return {"<edit>": (config, changes)}


def checkpoint_cases() -> list[Case]:
    """Copies of the quantized and VLM dirs with one thing wrong, loaded by generate."""
    def gen(where: str) -> list[str]:
        return ["generate", where, "-p", "Hi", "--max-new-tokens", "1"]

    q = "quantization_config"
    quant = {"group-huge": {q: {"group_size": 10**30}}, "group-zero": {q: {"group_size": 0}},
             "group-not-dividing": {q: {"group_size": 7}}, "bits-7": {q: {"bits": 7}},
             "method-unknown": {q: {"method": "awq"}}, "config-list": {q: [1, 2]},
             "quant-method-unknown": {q: {"quant_method": "hqq"}}, "desc-act-text": {q: {"desc_act": "yes"}}}
    cases = [Case(f"quantized:{name}", {"ckpt": "<copy:quant>", **edit(**change)}, gen("{d}/ckpt"), 3, "ckpt")
             for name, change in quant.items()]
    cases += [Case(f"quantized:{name}", {"ckpt": f"<copy:{source}>", "<tensor>": (tensor, shape)}, gen("{d}/ckpt"), 3,
                   "ckpt") for name, source, tensor, shape in [
        ("codes-shape", "quant", "model.layers.0.self_attn.q_proj.qweight", (3, 3)),
        ("scales-shape", "quant", "model.layers.0.self_attn.q_proj.scales", (1,)),
        ("codes-huge", "quant", "model.layers.0.mlp.up_proj.qweight", (4096, 4096)),
        ("nf4-state-shape", "nf4", "model.layers.0.self_attn.q_proj.weight.absmax", (5,)),
        ("nf4-codes-shape", "nf4", "model.layers.0.self_attn.q_proj.weight", (3, 1)),
        ("int8-weight-shape", "int8", "model.layers.0.self_attn.q_proj.weight", (2, 2)),
        ("int8-scb-shape", "int8", "model.layers.0.self_attn.q_proj.SCB", (1,)),
    ]]
    vision = {"patch-0": {"patch_size": 0}, "heads-0": {"num_attention_heads": 0},
              "heads-not-dividing": {"num_attention_heads": 3}, "hidden-text": {"hidden_size": "wide"},
              "image-1e9": {"image_size": 10**9}, "layers-1e5": {"num_hidden_layers": 100_000},
              "hidden-1e6": {"hidden_size": 10**6}, "intermediate-negative": {"intermediate_size": -1}}
    cases += [Case(f"vlm:vision-{name}", {"ckpt": "<copy:vlm>", **edit(vision_config=change)},
                   ["generate", "{d}/ckpt", "-p", "Hi", "--image", "{d}/x.png", "--max-new-tokens", "1"], 3, "ckpt")
              for name, change in vision.items()]
    top = {"feature-layer-99": {"vision_feature_layer": 99}, "feature-layer-minus-99": {"vision_feature_layer": -99},
           "image-token-1e9": {"image_token_index": 10**9}, "image-token-null": {"image_token_index": None},
           "image-token-text": {"image_token_index": "<image>"}, "image-token-pad": {"image_token_index": 2},
           "text-layers-1e5": {"text_config": {"num_hidden_layers": 100_000}},
           "text-config-list": {"text_config": [1]}, "vision-config-missing": {"vision_config": None},
           "feature-layer-text": {"vision_feature_layer": "last"}}
    cases += [Case(f"vlm:{name}", {"ckpt": "<copy:vlm>", **edit(**change)},
                   ["generate", "{d}/ckpt", "-p", "Hi", "--image", "{d}/x.png", "--max-new-tokens", "1"], 3, "ckpt")
              for name, change in top.items()]
    for case in cases:
        if case.name.startswith("vlm:"):
            case.files["x.png"] = good_png()
    cases += [
        Case("draft:other-tokenizer", {"draft": "<copy:other-tokenizer>"},
             ["generate", "{base}", "-p", "Hi", "--draft", "{d}/draft", "--max-new-tokens", "2"], 3, "draft"),
        Case("draft:a-vlm", {}, ["generate", "{base}", "-p", "Hi", "--draft", "{vlm}", "--max-new-tokens", "2"], 3,
             "vision-language"),
        Case("draft:missing", {}, ["generate", "{base}", "-p", "Hi", "--draft", "{d}/nothing"], 3, "nothing"),
        Case("draft:a-file", {"draft": "x"}, ["generate", "{base}", "-p", "Hi", "--draft", "{d}/draft"], 3, "draft"),
        Case("adapter-as-checkpoint", {"adapter/adapter_config.json": "{}"},
             ["eval", "{d}/adapter", "--task", "stories-mc", "--out", "{d}/out"], 3, "adapter"),
    ]
    return cases


FLOOR = [{"run": "pretrain", "value": "final.val_bpb", "max": 1.0, "why": "x"}]


def report_cases() -> list[Case]:
    def report(floors: str | None = "{d}/floors.yaml", runs: str = "{runs}") -> list[str]:
        return ["report", runs, "--out", "{d}/report", "--no-attention"] + (["--floors", floors] if floors else [])

    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))
    floors = {"not-utf8": b"- run: \xff\n", "utf16": json.dumps(FLOOR).encode("utf-16"),
              "deep": "[" * 100_000 + "]" * 100_000, "fifo": FIFO, "dev-zero": Link("/dev/zero"),
              "laughs": laughs, "a-mapping": "run: pretrain\n", "unknown-key": json.dumps([{**FLOOR[0], "op": "<"}]),
              "laughs-in-why": "x: &x [y, y, y, y, y, y, y, y, y]\n" + laughs.replace("a: &a [x, x, x, x, x, x, x, x, "
                                                                                       "x]\n", "a: &a [*x, *x]\n")
              + "checks:\n- {run: pretrain, value: final.val_bpb, max: 1, why: *i}\n",
              "value-not-a-path": json.dumps([{**FLOOR[0], "value": 7}]), "max-text": json.dumps([{**FLOOR[0],
                                                                                                  "max": "1"}])}
    cases = [Case(f"floors:{name}", {"floors.yaml": content}, report(), 2, "floors.yaml")
             for name, content in floors.items()]
    run_files = {  # one pretrain run dir's files, damaged; the report shows the run as unreadable or skips the bad
        "metrics-not-utf8": {"metrics.jsonl": b"\xff\xfe\n"},
        "manifest-deep": {"manifest.json": "[" * 100_000 + "]" * 100_000},
        "metrics-string-steps": {"metrics.jsonl": jsonl({"step": "one", "loss": 1.0}, {"step": [2], "loss": "x"})},
        "manifest-strings-for-numbers": {"manifest.json": json.dumps({"stage": "pretrain", "results": {
            "final": {"val_bpb": "low", "loss": [1]}, "seconds": "long"}, "started": 5, "finished": None})},
        "manifest-nul-name": {"manifest.json": json.dumps({"stage": "eval", "results": {"checkpoints": {
            "a\u0000b": {"tasks": {"t": {"acc": 1.0}}}}}})},
        "quantize-20k-rows": {"manifest.json": json.dumps({"stage": "quantize", "results": {"rows": [
            {"name": f"r{i}", "bytes": i, "bits": 4.0, "perplexity": 1.0 + i, "tasks": {}} for i in range(20_000)]}})},
        "recipe-not-yaml": {"recipe.yaml": "stage: [unclosed\n"},
    }
    for name, files in run_files.items():
        cases.append(Case(f"report-run:{name}", {"runs/x/recipe.yaml": "stage: pretrain\n",
                                                 **{f"runs/x/{k}": v for k, v in files.items()}},
                          report(floors=None, runs="{d}/runs"), 0, ""))  # shown as what it is; the report written
    return cases


ABSURD = {  # stage → (a valid recipe, {field: value}): each value set alone must be refused by `mmctl validate`
    "sft": (sft("c.jsonl"), {"train.batch_size": 10**12, "data.sources": [{"kind": "arithmetic",
                                                                           "conversations": 10**8}],
                             "eval.sample_tokens": 10**9, "train.micro_batch_size": 10**12}),
    "grpo": (grpo(), {"data.sources": [{"kind": "arithmetic", "problems": 10**7}], "grpo.temperature": 1e-300,
                      "grpo.epsilon_high": 1e300, "grpo.max_completion_tokens": 10**9, "grpo.top_p": 1e-300,
                      "grpo.reward_seconds": 1e9}),
    "align": (vision(), {"phases[0].train.batch_size": 10**9, "vision.encoder.image_size": 10**6,
                         "vision.encoder.hidden_size": 10**9, "eval.items": 10**9, "vision.encoder.num_layers": 10**6}),
    "quantize": ({"stage": "quantize", "base": "{base}", "methods": [{"method": "rtn", "bits": 8}],
                  "evaluation": {"data": "{d}"}},
                 {"evaluation.decode_tokens": 10**9, "methods[0].group": 10**30, "calibration.sequences": 10**9}),
    "eval": ({"stage": "eval", "checkpoints": ["{base}"], "tasks": [{"builtin": "arithmetic"}]},
             {"tasks[0].items": 10**9, "eval.samples": 10**6, "tasks[0].max_new_tokens": 10**9}),
    "pretrain": ({"stage": "pretrain", "data": {"path": "{d}"}}, {"eval.sample_tokens": 10**9}),
}


def absurd_cases() -> list[Case]:
    cases = []
    for stage, (recipe, changes) in ABSURD.items():
        for path, value in changes.items():
            cases.append(Case(f"absurd:{stage}:{path}={value!r}", {"r.yaml": yaml(recipe)},
                              ["validate", "{d}/r.yaml", "--set", f"{path}={json.dumps(value)}"], 2,
                              path.split("=")[0]))
    cases += [  # validate checks a recipe's inputs exist and are of their kind
        Case("validate:base-missing", {"r.yaml": yaml({**sft("c.jsonl"), "base": "{d}/nowhere"}), "c.jsonl": ""},
             ["validate", "{d}/r.yaml"], 3, "r.yaml"),
        Case("validate:source-missing", {"r.yaml": yaml(sft("gone.jsonl"))}, ["validate", "{d}/r.yaml"], 3,
             "r.yaml"),
        Case("validate:base-not-a-checkpoint", {"r.yaml": yaml({**sft("c.jsonl"), "base": "{d}"}), "c.jsonl": ""},
             ["validate", "{d}/r.yaml"], 3, "r.yaml"),
        Case("validate:pretrain-data-missing", {"r.yaml": yaml({"stage": "pretrain", "data": {"path": "{d}/no"}})},
             ["validate", "{d}/r.yaml"], 3, "r.yaml"),
    ]
    return cases


def cases() -> list[Case]:
    return (chat_data_cases() + datasets_cases() + rl_data_cases() + reward_cases() + image_cases()
            + checkpoint_cases() + report_cases() + absurd_cases())
