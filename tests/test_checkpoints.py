"""HF interop against transformers itself: the same weights give the same logits both ways, fp32, within 1e-5.

mmctl → checkpoints.save → `AutoModelForCausalLM.from_pretrained`, and transformers `save_pretrained` →
checkpoints.load_lm → mmctl, on random small configs (Llama GQA untied, Llama MQA tied, Qwen2 with biases and an
explicit head_dim, Llama 3.1 RoPE scaling, Mistral); plus the refusals (pickle, missing/mismatched tensors,
unsupported families) and the checkpoint dir's tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file  # noqa: E402

from mmctl import checkpoints, hf  # noqa: E402
from mmctl.errors import DataError, UnsafeInputError  # noqa: E402
from mmctl.models.transformer import ModelConfig, Transformer  # noqa: E402
from mmctl.tokenizer import bpe  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()

SMALL = dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_layers=2, num_heads=4)
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {
    "llama-gqa-untied": ModelConfig(**SMALL, num_kv_heads=2, tie_embeddings=False),
    "llama-mqa-tied": ModelConfig(**SMALL, num_kv_heads=1, tie_embeddings=True, rms_norm_eps=1e-6),
    "qwen2-bias-head-dim": ModelConfig(**SMALL, num_kv_heads=2, head_dim=64, qkv_bias=True, rope_theta=1e6),
    "llama3-rope-scaling": ModelConfig(**SMALL, num_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3),
}


def random_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # away from ones and zeros, so they are really compared
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return model


def inputs():
    """Two rows of 24 tokens, the second left-padded by 5."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    return ids, mask


def assert_same_logits(ours: Transformer, theirs) -> None:
    ids, mask = inputs()
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-5
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        a = ours(ids, attention_mask=mask)
        b = theirs(ids, attention_mask=mask, position_ids=positions).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-5


def hf_model(cfg: ModelConfig):
    """A randomly initialised transformers model of `cfg`'s architecture (norms and biases randomised too)."""
    torch.manual_seed(0)
    fields = cfg.to_hf()
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_mmctl_checkpoint_loads_in_transformers_with_the_same_logits(name, tmp_path):
    ours = random_model(CONFIGS[name])
    checkpoints.save(ours, tmp_path / "model")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(theirs).__name__ == ("Qwen2ForCausalLM" if ours.cfg.qkv_bias else "LlamaForCausalLM")
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_checkpoint_loads_in_mmctl_with_the_same_logits(name, tmp_path):
    theirs = hf_model(CONFIGS[name])
    theirs.save_pretrained(tmp_path / "model")
    ours = checkpoints.load_lm(tmp_path / "model")
    assert ours.cfg == CONFIGS[name]
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ours.cfg.tie_embeddings
    assert_same_logits(ours, theirs)


def test_sharded_checkpoint(tmp_path):
    theirs = hf_model(CONFIGS["llama-gqa-untied"])
    theirs.save_pretrained(tmp_path / "model", max_shard_size="100KB")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    assert_same_logits(checkpoints.load_lm(tmp_path / "model"), theirs)


def test_mistral_loads_with_its_window_as_the_context(tmp_path):
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                                        max_position_embeddings=4096)
    theirs = transformers.MistralForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path / "model")
    ours = checkpoints.load_lm(tmp_path / "model")
    assert ours.cfg.max_position_embeddings == 64
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trip(name):
    cfg = CONFIGS[name]
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama-gqa-untied"].to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled, ever")
    with pytest.raises(UnsafeInputError, match=r"pytorch_model\.bin: refusing a pickle checkpoint") as e:
        checkpoints.load_lm(tmp_path)
    assert e.value.exit_code == 4


def test_missing_and_mismatched_tensors_are_data_errors(tmp_path):
    path = checkpoints.save(random_model(CONFIGS["llama-gqa-untied"]), tmp_path / "model")
    tensors = load_file(path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing \(expected shape "
                                        r"\[96, 128\]\)"):
        checkpoints.load_lm(path)

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"gate_proj\.weight has shape \[96, 128\], config.json implies \[64, 128\]"):
        checkpoints.load_lm(path)

    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read safetensors"):
        checkpoints.load_lm(path)
    with pytest.raises(DataError, match="checkpoint dir not found"):
        checkpoints.load_lm(tmp_path / "nowhere")


def test_unsupported_families_and_features_are_data_errors():
    """A checkpoint's config.json is input data: what mmctl cannot load is exit 3, naming the file."""
    fields = CONFIGS["llama-gqa-untied"].to_hf()
    with pytest.raises(DataError, match=r"model_type 'gpt2' is not supported \(supported: llama, mistral, qwen2\)"):
        ModelConfig.from_hf({**fields, "model_type": "gpt2"})
    with pytest.raises(DataError, match="attention_bias"):
        ModelConfig.from_hf({**fields, "attention_bias": True})
    with pytest.raises(DataError, match="rope type 'yarn'"):
        ModelConfig.from_hf({**fields, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None})


def write_tokenizer(path: Path) -> None:
    """A tiny byte-level BPE with the reserved special tokens, as mmctl's tokenizer stage writes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "hello there"], trainer)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|pad|>"}))


def test_checkpoint_dir_carries_the_tokenizer_and_special_ids(tmp_path):
    write_tokenizer(tmp_path / "tok")
    cfg = ModelConfig(**{**SMALL, "vocab_size": 320}, num_kv_heads=2)
    path = checkpoints.save(random_model(cfg), tmp_path / "model", bpe.load(tmp_path / "tok"))
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer.eos_token == "<|eos|>"
    assert hf.eos_token_ids(path) == [tokenizer.eos_token_id] == [1]
    generation = transformers.GenerationConfig.from_pretrained(path)
    assert (generation.bos_token_id, generation.pad_token_id) == (0, 2)
    with pytest.raises(DataError, match="no tokenizer.json"):  # the tokenizer is read before anything is written
        checkpoints.save(random_model(cfg), tmp_path / "other", bpe.load(tmp_path))
    assert not (tmp_path / "other").exists()


def test_a_failed_save_leaves_the_old_checkpoint_alone(tmp_path, monkeypatch):
    model = random_model(CONFIGS["llama-gqa-untied"])
    path = checkpoints.save(model, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp dir left beside it


def test_integer_tensors_keep_their_dtype(tmp_path):
    """int8 weights and packed int4 bytes survive a read that casts floating tensors."""
    save_file({"q": torch.tensor([[-128, 127]], dtype=torch.int8), "w": torch.ones(2, dtype=torch.float64)},
              tmp_path / "model.safetensors")
    tensors = hf.read_tensors(tmp_path, {"q": (1, 2), "w": (2,)}, dtype=torch.bfloat16)
    assert tensors["q"].dtype == torch.int8 and tensors["q"].tolist() == [[-128, 127]]
    assert tensors["w"].dtype == torch.bfloat16


def test_weights_outside_the_checkpoint_dir_are_refused(tmp_path):
    """Paths are resolved (symlinks followed), then confined to the checkpoint dir."""
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.ones(2)}, outside)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(outside)
    with pytest.raises(UnsafeInputError, match="outside the checkpoint dir"):
        hf.read_tensors(ckpt, {"w": (2,)})
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(UnsafeInputError, match="outside the checkpoint dir"):
        hf.read_tensors(ckpt, {"w": (2,)})


def test_a_fifo_config_is_refused_not_read(tmp_path):
    import os

    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(DataError, match="not a regular file"):
        checkpoints.load_lm(tmp_path)


def test_a_config_far_larger_than_its_weights_is_refused_before_building(tmp_path):
    path = checkpoints.save(random_model(CONFIGS["llama-gqa-untied"]), tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 10**9, "intermediate_size": 10**7}))
    with pytest.raises(DataError, match="more than twice what the weight files hold"):
        checkpoints.load_lm(path)


def test_a_hub_cache_snapshot_loads(tmp_path):
    """The Hugging Face cache links snapshots/<rev>/model.safetensors to ../../blobs/<hash>: that is allowed,
    a link anywhere else is not."""
    source = checkpoints.save(random_model(CONFIGS["llama-gqa-untied"]), tmp_path / "model")
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        blob = repo / "blobs" / f"hash-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    loaded = checkpoints.load_lm(snapshot)
    assert torch.equal(loaded.lm_head.weight, checkpoints.load_lm(source).lm_head.weight)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(source / "model.safetensors")  # outside the repository
    with pytest.raises(UnsafeInputError, match="outside the checkpoint dir"):
        checkpoints.load_lm(snapshot)


def test_recorded_attention_weights_are_transformers_output_attentions(tmp_path):
    """`Attention.record` (what `mmctl report` draws) keeps the softmax weights: transformers' eager attention's
    `output_attentions`, layer by layer and head by head, with and without left padding; logits unchanged."""
    ours = random_model(CONFIGS["llama-gqa-untied"])
    checkpoints.save(ours, tmp_path / "model")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="eager").eval()
    ids, mask = inputs()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = ours(ids, attention_mask=mask)
        for layer in ours.model.layers:
            layer.self_attn.record = True
        recorded = ours(ids, attention_mask=mask)
        expected = theirs(ids, attention_mask=mask, position_ids=positions, output_attentions=True).attentions
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-5)
    for layer, want in zip(ours.model.layers, expected, strict=True):
        got = layer.self_attn.weights
        assert got.shape == (2, 4, 24, 24)
        real = mask.bool()  # padding queries attend to themselves in mmctl; HF's rows there are arbitrary
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1][:, real[1]], want[1][:, real[1]], atol=1e-5, rtol=1e-5)


def test_a_chat_model_stops_in_transformers_where_it_stops_in_mmctl(checkpoint, tmp_path):
    """A chat model's generation_config names the end-of-turn token: transformers' greedy answer is mmctl's, and
    both stop at <|end|>. The model is made to say <|end|> where it would have said its 3rd token."""
    import transformers

    from mmctl.data.chat import prompt_ids, stop_ids
    from mmctl.generate import SamplingConfig, generate

    model, tok = checkpoints.load(checkpoint)
    prompt = prompt_ids([{"role": "user", "content": "What is 2 + 2?"}], tok)
    free = generate(model, [prompt], SamplingConfig(max_new_tokens=8)).completions[0].ids
    end = tok.token_id("<|end|>")
    with torch.no_grad():  # <|end|> scores a shade above the token it replaces, wherever that one leads
        model.lm_head.weight[end] = model.lm_head.weight[free[2]] * 1.02
    checkpoints.save(model, tmp_path / "chat", tok, chat=True)
    assert json.loads((tmp_path / "chat" / "generation_config.json").read_text())["eos_token_id"] == stop_ids(tok)
    model, tok = checkpoints.load(tmp_path / "chat")
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=8), stop_token_ids=stop_ids(tok)).completions[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "chat").generate(
        torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt):].tolist()
    assert ours.finish_reason == "stop" and ours.ids[-1] == end and len(ours.ids) < 8
    assert theirs == ours.ids


def test_transformers_refuses_a_checkpoint_of_mmctls_packed_layers(checkpoint, tmp_path):
    """rtn / gptq dirs (mmctl's own layout) must not load in transformers as a Llama with missing, random weights:
    their model_type makes it refuse; mmctl loads them as before."""
    import transformers

    from mmctl.quant import MethodConfig, quantize

    model, tok = checkpoints.load(checkpoint)
    config = quantize(model, MethodConfig("rtn", bits=4, group=32), ("lm_head",))
    out = checkpoints.save(model, tmp_path / "q", tok, quantization=config)
    with pytest.raises(ValueError, match="mmctl_quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    back, _ = checkpoints.load(out, quantized=True)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
