"""Hugging Face checkpoint interop: save mmctl's model as an HF checkpoint dir, load HF dirs into it.

The checkpoint dir is DESIGN §5's: `config.json`, `model.safetensors` with HF parameter names (mmctl's own names,
so nothing is renamed), `generation_config.json` and the tokenizer files. It loads offline with
`transformers.AutoModelForCausalLM.from_pretrained(dir)`; the config mapping follows transformers' LlamaConfig
and Qwen2Config. `load_checkpoint` reads local dirs of the Llama, Mistral, Qwen2 and SmolLM (= llama) families,
single-file or sharded (`model.safetensors.index.json`).

Leaves out: pickle weights (`.bin`, `.pt`, … are refused: loading them can run code), hub downloads, and sliding-
window attention — a Mistral/Qwen2 window is honoured by capping the context at the window, where full attention
and windowed attention agree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmctl.artifacts import atomic_write_json, publish_dir
from mmctl.errors import DataError, UnsafeInputError, UsageError
from mmctl.models.transformer import ModelConfig, Rotary, Transformer
from mmctl.tokenizer import bpe

SUPPORTED = ("llama", "mistral", "qwen2")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# transformers' defaults for fields a config.json may leave out (LlamaConfig / MistralConfig / Qwen2Config).
DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0),
    "mistral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


# --- config.json ---------------------------------------------------------------------------------------------

def config_to_hf(cfg: ModelConfig) -> dict:
    """ModelConfig → config.json fields: a `llama` model, or `qwen2` when it has q/k/v biases."""
    model_type = _family(cfg)
    rope_scaling = None if cfg.rope_scaling is None else {"rope_type": "llama3", **cfg.rope_scaling}
    out = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters; both say the same thing.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rope_scaling or {})},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def config_from_hf(hf: dict, name: str = "config.json") -> ModelConfig:
    """config.json fields → ModelConfig. UsageError for a family or feature mmctl's model does not have."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise UsageError(f"{name}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise DataError(f"{name}: missing {', '.join(missing)}")
    get = {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}.get
    if get("hidden_act", "silu") != "silu":
        raise UsageError(f"{name}: hidden_act {get('hidden_act')!r} is not supported (only silu)")
    if model_type == "llama" and get("attention_bias", False):
        raise UsageError(f"{name}: attention_bias: true (an o_proj bias too) is not supported; "
                         "mmctl has q/k/v biases only (Qwen2)")
    if get("mlp_bias", False):
        raise UsageError(f"{name}: mlp_bias: true is not supported")

    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})  # legacy keys win, as in transformers
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UsageError(f"{name}: rope type {rope_type!r} is not supported (supported: default, llama3)")
    theta = hf.get("rope_theta") or rope.get("rope_theta") or get("rope_theta")
    scaling = None
    if rope_type == "llama3":
        scaling = {k: rope.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_position_embeddings"] = rope.get("original_max_position_embeddings",
                                                               get("max_position_embeddings"))

    context = get("max_position_embeddings")
    window = get("sliding_window") if model_type == "mistral" or get("use_sliding_window", False) else None
    if window:  # full attention equals windowed attention up to the window, so stop there
        context = min(context, window)
    heads = hf["num_attention_heads"]
    head_dim = get("head_dim")
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=get("num_key_value_heads", heads),
        head_dim=None if head_dim == hf["hidden_size"] // heads else head_dim, max_position_embeddings=context,
        rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=get("rms_norm_eps"),
        tie_embeddings=bool(get("tie_word_embeddings", False)), qkv_bias=model_type == "qwen2",
        init_std=get("initializer_range", 0.02))
    problems = cfg.check()
    if problems:
        raise DataError(*(f"{name}: {field}: {message}" for field, message in problems))
    return cfg


# --- save ----------------------------------------------------------------------------------------------------

def save_checkpoint(model: Transformer, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` (and the tokenizer files in `tokenizer_dir`) as an HF checkpoint dir at `out`.

    Everything is written to a temp dir beside `out` and published by rename: a killed save leaves the old dir
    or the new one, never half of one.
    """
    out = Path(out)
    tokenizer_files = _tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    special = _special_token_ids(tokenizer_dir) if tokenizer_dir is not None else {}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = model.state_dict()
        if model.cfg.tie_embeddings:
            # transformers stores a tied head once, under the embedding's name, and re-ties on load
            state.pop("lm_head.weight")
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _fsync(tmp / "model.safetensors")
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        atomic_write_json(tmp / "config.json", {**config_to_hf(model.cfg), **special, "torch_dtype": dtype})
        atomic_write_json(tmp / "generation_config.json", {**special, "do_sample": False})
        for f in tokenizer_files:
            shutil.copyfile(f, tmp / f.name)
            _fsync(tmp / f.name)
        return publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tokenizer_files(tokenizer_dir: str | Path) -> list[Path]:
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise DataError(f"{tokenizer_dir / 'tokenizer.json'}: tokenizer file not found")
    return [tokenizer_dir / n for n in bpe.FILES if (tokenizer_dir / n).is_file()]


def _special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """bos/eos/pad token ids named in tokenizer_config.json (or special_tokens_map.json), for config.json."""
    tokenizer_dir = Path(tokenizer_dir)
    vocab = _read_json(tokenizer_dir / "tokenizer.json")
    model_vocab = (vocab.get("model") or {}).get("vocab")
    ids = dict(model_vocab) if isinstance(model_vocab, dict) else {}  # BPE / WordPiece (Unigram's is a list)
    ids.update({t["content"]: t["id"] for t in vocab.get("added_tokens", [])})  # special tokens live here
    named = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        if (tokenizer_dir / name).is_file():
            named.update(_read_json(tokenizer_dir / name))
    out = {}
    for role in ("bos", "eos", "pad"):
        token = named.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and token in ids:
            out[f"{role}_token_id"] = ids[token]
    return out


# --- load ----------------------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                    ) -> Transformer:
    """A local HF checkpoint dir (llama / mistral / qwen2, safetensors only) → mmctl's Transformer, in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: checkpoint dir not found")
    cfg = config_from_hf(_read_json(path / "config.json"), str(path / "config.json"))
    files = _weight_files(path)

    with torch.device("meta"):  # no time spent on a random init that is overwritten anyway
        model = Transformer(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    tensors = {}
    for file, names in files.items():
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in names or f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight"):
                        continue  # derived, not learned: old Llama checkpoints stored it; a tied head is the embedding
                    if name not in expected:
                        raise DataError(f"{file}: unexpected tensor {name} (not in a {_family(cfg)} model with "
                                        f"this config.json)")
                    tensors[name] = f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError) as e:
            raise DataError(f"{file}: cannot read safetensors: {e}") from None
    for name, shape in expected.items():
        if name not in tensors:
            raise DataError(f"{path}: tensor {name} is missing (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise DataError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, config.json implies "
                            f"{list(shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers are not in the file: compute them on the real device
    model.model.rotary = Rotary(cfg).to(device)
    return model.eval()


def _family(cfg: ModelConfig) -> str:
    return "qwen2" if cfg.qkv_bias else "llama"


def _weight_files(path: Path) -> dict[Path, list[str] | None]:
    """The safetensors files to read, each with its tensor names (None: all of them)."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return {single: None}
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DataError(f"{index}: no weight_map")
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            shard = path / file
            if shard.parent != path:
                raise UnsafeInputError(f"{index}: shard {file!r} is outside the checkpoint dir")
            if not shard.is_file():
                raise DataError(f"{shard}: shard named in {index.name} not found")
            files.setdefault(shard, []).append(name)
        return files
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UnsafeInputError(f"{pickled[0]}: refusing a pickle checkpoint (loading it can run arbitrary code); "
                               "convert it to model.safetensors")
    raise DataError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def eos_token_ids(path: str | Path) -> list[int]:
    """The ids that end generation for checkpoint dir `path`: generation_config.json's eos_token_id, else
    config.json's (an int or a list in either)."""
    path = Path(path)
    for name in ("generation_config.json", "config.json"):
        if (path / name).is_file():
            eos = _read_json(path / name).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []
