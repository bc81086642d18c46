"""The hostile recipe corpus, as data: YAML that attacks the parser, and well-formed YAML with values that are
wrong, absurd or dangerous for each stage's fields. Every case must end in exit code 2 with error lines that name
the recipe file — no traceback, no hang, no runaway memory, nothing executed.

A case is (name, recipe text or bytes, expected exit code). `{canary}` in a text is replaced by a path that must
still not exist afterwards.
"""

from __future__ import annotations

LAUGHS = "stage: tokenize\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True))

SYNTAX = [
    ("yaml-unclosed-bracket", "stage: tokenize\nrun: [out\n"),
    ("yaml-unclosed-quote", 'stage: tokenize\nrun:\n  out: "abc\n'),
    ("yaml-bad-indent", "stage: tokenize\nrun:\n  out: a\n   seed: 1\n"),
    ("yaml-tab-indent", "stage: tokenize\nrun:\n\tout: a\n"),
    ("yaml-nul-byte", "stage: tokenize\nrun:\n  out: a\x00b\n"),
    ("yaml-control-char", "stage: tokenize\nrun:\n  out: a\x07b\n"),
    ("yaml-not-utf8", b"stage: tokenize\nrun:\n  out: \xff\xfe\n"),
    ("yaml-utf16", "stage: tokenize\n".encode("utf-16")),
    ("yaml-two-documents", "stage: tokenize\n---\nstage: pretrain\n"),
    ("yaml-root-list", "- stage\n- tokenize\n"),
    ("yaml-root-scalar", "tokenize\n"),
    ("yaml-empty", ""),
    ("yaml-only-comment", "# nothing\n"),
    ("yaml-deep-brackets", "stage: tokenize\nx: " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("yaml-deep-mappings", "stage: tokenize\nx: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n"),
    ("yaml-billion-laughs", LAUGHS),
    ("yaml-self-alias", "stage: tokenize\na: &a [*a]\n"),
    ("yaml-alias-undefined", "stage: tokenize\na: *nothing\n"),
    ("yaml-duplicate-key", "stage: tokenize\nrun:\n  out: a\n  out: b\n"),
    ("yaml-duplicate-section", "stage: tokenize\nrun: {}\nrun: {}\n"),
    ("yaml-int-key", "stage: tokenize\n1: a\n"),
    ("yaml-null-key", "stage: tokenize\n~: a\n"),
    ("yaml-list-key", "stage: tokenize\n? [a, b]\n: c\n"),
    ("yaml-merge-key", "stage: tokenize\nbase: &b {out: x}\nrun:\n  <<: *b\n"),
    ("tag-python-name", "stage: tokenize\nrun:\n  seed: !!python/name:os.system\n"),
    ("tag-python-apply", "stage: tokenize\nrun:\n  out: !!python/object/apply:os.system ['touch {canary}']\n"),
    ("tag-python-new", "stage: tokenize\nrun: !!python/object/new:os.system ['touch {canary}']\n"),
    ("tag-python-module", "stage: tokenize\nrun:\n  out: !!python/module:os\n"),
    ("tag-custom-scalar", "stage: tokenize\nrun:\n  seed: !foo 4\n"),
    ("tag-custom-mapping", "stage: tokenize\nrun: !section {out: a}\n"),
    ("tag-on-key", "stage: tokenize\n!bar run: {}\n"),
    ("tag-binary", "stage: tokenize\nrun:\n  out: !!binary aGVsbG8=\n"),
    ("tag-set", "stage: tokenize\nrun: !!set {a, b}\n"),
    ("tag-timestamp", "stage: tokenize\nrun:\n  out: 2001-12-14t21:59:43.10-05:00\n"),
    ("stage-unknown", "stage: finetune\n"),
    ("stage-missing", "run:\n  out: a\n"),
    ("stage-list", "stage: [tokenize]\n"),
]

# stage → {field path: [bad values (YAML text)]}: each becomes one recipe with that value set
BAD_VALUES = {
    "tokenize": {
        "run.out": ["[a, b]", "{a: 1}", "42"],
        "run.seed": ["-1", "1.5", "'7'", "true", "1e29", "100000000000000000000000000000", ".nan"],
        "run.device": ["tpu", "1"],
        "data.val_fraction": ["1.5", "-0.1", ".inf", ".nan", "'a'"],
        "data.sources": ["{kind: stories}", "[{kind: novels}]", "[{kind: text}]", "[{kind: stories}]",
                         "[{kind: stories, documents: 1e24}]", "[{kind: stories, documents: 0}]",
                         "[{kind: stories, documents: 10, weight: -1}]", "[{kind: stories, documents: 10, path: x}]",
                         "[{kind: text, path: a, separator: ''}]", "[{kind: jsonl, path: a, separator: x}]",
                         "[{kind: stories, documents: 10, wieght: 2}]", "[]"],
        "tokenizer.vocab_size": ["100000000000000", "4294967296", "12", "-5", "4096.5", "'4096'", "null"],
        "tokenizer.pattern": ["gpt4", "''"],
        "tokenizer.min_frequency": ["0", ".inf"],
        "shards.shard_tokens": ["0", "'many'"],
    },
    "pretrain": {
        "data.path": ["null", "[a]", "7"],
        "model.hidden_size": ["0", "-64", "'wide'", "true", "64.0", ".inf"],
        "model.num_heads": ["3", "0"],
        "model.num_kv_heads": ["3", "0", "-2"],
        "model.vocab_size": ["0", "[1]"],
        "model.head_dim": ["7", "1", "0"],
        "model.rope_theta": ["-1.0", "0", ".nan", "'big'", ".inf"],
        "model.rms_norm_eps": [".nan", "-1e-5", "0"],
        "model.rope_scaling": ["[1, 2]", "{factor: 8}", "{rope_type: yarn, factor: 8}", "7",
                               "{factor: x, low_freq_factor: 1, high_freq_factor: 4, "
                               "original_max_position_embeddings: 8}"],
        "model.init_std": ["0", "-0.02"],
        "optim.lr": ["0", "-1e-3", ".inf", ".nan", "'fast'"],
        "optim.min_lr": ["1.0"],
        "optim.schedule": ["linear", "COSINE"],
        "optim.beta1": ["1.0", "-0.1"],
        "optim.beta2": ["1"],
        "optim.eps": ["0"],
        "optim.grad_clip": ["-1"],
        "optim.decay_fraction": ["0", "2"],
        "train.steps": ["0", "1e21", "1000000000000000000000", "1.5", "'ten'"],
        "train.batch_size": ["0", "-16", "[16]"],
        "train.micro_batch_size": ["3", "0"],
        "train.seq_len": ["0", "100000"],
        "train.precision": ["fp16", "half"],
        "train.log_every": ["0"],
        "train.keep_checkpoints": ["0"],
        "train.compile": ["'yes'", "2"],
        "eval.tokens": ["0", "1"],
        "eval.sample_tokens": ["-1"],
        "trian.steps": ["10"],
        "model.hidden_sise": ["64"],
    },
    "sft": {
        "base": ["null", "[a]"],
        "method": ["dora", "LoRA"],
        "lora.r": ["0", "1e9", "'8'"],
        "lora.alpha": ["0", ".inf"],
        "lora.dropout": ["1.0", "-0.1"],
        "lora.target_modules": ["[]", "q_proj"],
        "data.sources": ["[]", "[{kind: jsonl}]", "[{kind: arithmetic}]", "[{kind: arithmetic, path: x}]",
                         "[{kind: chats, path: x}]", "[{kind: arithmetic, conversations: 0}]"],
        "data.val_fraction": ["1", "-1"],
        "data.packing": ["'yes'"],
    },
    "eval": {
        "checkpoints": ["[]", "a", "[[a]]"],
        "tasks": ["[]", "[{builtin: trivia}]", "[{kind: generation}]", "[{kind: perplexity, data: a, stride: 0}]",
                  "[{builtin: arithmetic, data: x}]", "[{kind: generation, data: a, extract: 'regex:('}]",
                  "[{kind: generation, data: a, extract: fuzzy}]", "[{builtin: arithmetic}, {builtin: arithmetic}]",
                  "[{builtin: arithmetic, items: 0}]", "[{builtin: arithmetic, max_new_tokens: -1}]"],
        "eval.batch_size": ["0", ".inf"],
        "eval.limit": ["0", "-1"],
    },
    "align-vision": {
        "base": ["null", "[a]"],
        "vision.encoder": ["{image_size: 48, patch_size: 7}", "{image_size: 0}", "{num_heads: 5}",
                           "{hidden_size: -1}", "{image_size: 1e9}"],
        "vision.projector": ["{kind: qformer}", "{kind: pixel_shuffle, scale_factor: 0}",
                             "{kind: pixel_shuffle, scale_factor: 3}", "mlp"],
        "vision.feature_layer": ["9", "-9", "'last'"],
        "phases": ["[]", "[{name: a}]", "[{sources: [{kind: shapes, items: 10}]}]",
                   "[{name: a, sources: [{kind: shapes}]}]", "[{name: a, sources: [{kind: jsonl}]}]",
                   "[{name: a, sources: [{kind: shapes, items: 10, path: x}]}]",
                   "[{name: a, sources: [{kind: coco, items: 10}]}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], trainable: {}}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], trainable: {vit: 1.0}}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], trainable: {language_model: -1}}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], trainable: {language_model: true}}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], objective: siglip}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], objective: dino}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], val_fraction: 1}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}]}, {name: a, sources: [{kind: shapes, items: 10}]}]",
                   "[{name: a, sources: [{kind: shapes, items: 10}], train: {steps: 0}}]"],
        "eval.items": ["0", "-1"],
    },
    "quantize": {
        "base": ["null", "[a]"],
        "methods": ["[]", "[{method: awq}]", "[{bits: 4}]", "[{method: rtn, bits: 5}]", "[{method: rtn, bits: 1}]",
                    "[{method: gptq, bits: 8}]", "[{method: rtn, bits: 4, group: 0}]", "[{method: rtn, bits: 4.5}]",
                    "[{method: gptq, damp: 0}]", "[{method: gptq, damp: 2}]", "[{method: rtn}, {method: rtn}]",
                    "[{method: rtn, bits: '4'}]", "{method: rtn}", "[{method: int8-bnb, outlier_threshold: -1}]",
                    "[{method: int8-bnb, outlier_threshold: .nan}]"],
        "calibration.sequences": ["0", "1e9"],
        "calibration.seq_len": ["0"],
        "evaluation.tokens": ["0"],
        "evaluation.tasks": ["[{builtin: trivia}]"],
        "skip": ["lm_head"],
    },
    "account": {
        "model.preset": ["llama-7", "[llama-7b]"],
        "model.hf": ["[1, 2]", "'llama'"],
        "train.tokens": [".inf", "-.inf", ".nan", "0", "1e30", "-5"],
        "train.seq_len": ["1e38", "100000000000000000000000000000000000000", "0"],
        "train.batch_size": ["0", "1e12"],
        "train.zero": ["4", "-1"],
        "train.precision": ["fp8"],
        "hardware.gpu": ["h200x", "7"],
        "hardware.num_gpus": ["0", "100000000000"],
        "hardware.mfu": ["0", "1.5", ".nan"],
    },
}
VALID = {  # a minimal valid recipe per stage (values as YAML text), before the bad value is set
    "tokenize": {"data": {"sources": "[{kind: stories, documents: 10}]"}},
    "pretrain": {"data": {"path": "out/tokenize"}},
    "eval": {"checkpoints": "[ckpt]", "tasks": "[{builtin: arithmetic}]"},
    "sft": {"base": "ckpt", "data": {"sources": "[{kind: arithmetic, conversations: 10}]"}},
    "account": {"model": {"preset": "gpt2"}},
    "align-vision": {"base": "ckpt", "phases": "[{name: a, sources: [{kind: shapes, items: 10}]}]"},
    "quantize": {"base": "ckpt", "methods": "[{method: rtn, bits: 8}]", "evaluation": {"data": "shards"}},
}


def recipe_text(stage: str, path: str, value: str) -> str:
    """The stage's valid recipe with the field at `path` (dotted) set to the YAML text `value`."""
    import copy

    body = copy.deepcopy(VALID[stage])
    node = body
    *sections, field = path.split(".")
    for section in sections:
        if not isinstance(node.get(section), dict):
            node[section] = {}
        node = node[section]
    node[field] = value
    return f"stage: {stage}\n" + _emit(body)


def _emit(mapping: dict, indent: str = "") -> str:
    return "".join(f"{indent}{k}:\n" + _emit(v, indent + "  ") if isinstance(v, dict) else f"{indent}{k}: {v}\n"
                   for k, v in mapping.items())


def cases() -> list[tuple[str, str | bytes, int]]:
    out: list[tuple[str, str | bytes, int]] = [(name, text, 2) for name, text in SYNTAX]
    for stage, fields in BAD_VALUES.items():
        for path, values in fields.items():
            out += [(f"{stage}:{path}={value}", recipe_text(stage, path, value), 2) for value in values]
    return out
