"""Checkpoint directories: any of them resolved to a model and its tokenizer, and a model written as one.

`load(path)` takes what every command takes — a language model dir (mmctl's, or a local Hugging Face Llama /
Mistral / Qwen2 / SmolLM), a training checkpoint `checkpoints/step-N` of a full run, a VLM (Llava's layout or
mmctl's own), a quantized dir (mmctl's packed layers or bitsandbytes') — checks the weights against config.json
before allocating anything, and returns (model, tokenizer). `save(model, out, tok)` writes the Hugging Face layout
transformers loads offline. The models own their config mappings (`ModelConfig.to_hf` / `from_hf`, `llava_config`);
safetensors IO is `hf.py`'s; quantized layouts are `quant/checkpoint.py`'s. LoRA adapters (PEFT's files)
are `models/lora.py`'s: an adapter merges into the model that `save` writes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from mmctl import hf
from mmctl.errors import DataError
from mmctl.models.config import ModelConfig
from mmctl.models.projector import ProjectorConfig
from mmctl.models.transformer import Rotary, Transformer
from mmctl.models.vit import ViTConfig
from mmctl.models.vlm import VLM, VisionSection, llava_config, state_for_llava
from mmctl.quant import checkpoint as qcheckpoint
from mmctl.tokenizer import bpe

CHAT_MARK = "mmctl_chat_model"  # generation_config.json: true when the model was tuned on chat turns (sft, rl)


def quantization_of(path: str | Path) -> dict | None:
    """The `quantization_config` of checkpoint dir `path` (mmctl's or bitsandbytes'), None if it has none."""
    return qcheckpoint.read_config(Path(path))


def lm_files(model: Transformer, tokenizer=None, chat: bool = False, quantization: dict | None = None
             ) -> dict[str, dict]:
    """config.json and generation_config.json for `model` (with the tokenizer's bos/eos/pad ids; `chat` marks a
    model tuned to answer through its chat template, which is how `mmctl eval` then asks it questions;
    `quantization`: the quantization_config of its quantized layers)."""
    special = tokenizer.special_token_ids() if tokenizer is not None else {}
    config = {**model.cfg.to_hf(), **special, "torch_dtype": str(model.dtype).removeprefix("torch.")}
    if quantization:
        config["quantization_config"] = quantization
    if quantization and quantization.get("quant_method") == "mmctl":  # packed layers only mmctl reads
        config |= {"model_type": hf.QUANTIZED_MODEL_TYPE, "base_model_type": config["model_type"],
                   "architectures": ["MmctlQuantizedForCausalLM"]}
    return {"config.json": config, "generation_config.json": generation_config(tokenizer, chat)}


def generation_config(tokenizer, chat: bool) -> dict:
    """generation_config.json: greedy, the tokenizer's special ids and, for a chat model, the end-of-turn token
    among the stop tokens (so transformers' `generate` stops where `mmctl generate` does) and CHAT_MARK."""
    special = tokenizer.special_token_ids() if tokenizer is not None else {}
    if chat and tokenizer is not None:
        from mmctl.data.chat import stop_ids

        special["eos_token_id"] = stop_ids(tokenizer)
    return {**special, "do_sample": False, **({CHAT_MARK: True} if chat else {})}


def save(model: Transformer | VLM, out: str | Path, tokenizer=None, chat: bool = False,
         quantization: dict | None = None) -> Path:
    """Write `model` (and `tokenizer`'s files) as a Hugging Face checkpoint dir that transformers loads offline
    (`AutoModelForCausalLM`; a VLM: `save_vlm`). `quantization`: the quantization_config of its quantized
    layers (mmctl/quant)."""
    if isinstance(model, VLM):
        return save_vlm(model, out, tokenizer, chat)
    state = model.state_dict()
    if model.cfg.tie_embeddings:  # transformers stores a tied head once, under the embedding's name
        state.pop("lm_head.weight")
    return hf.write_dir(out, state, lm_files(model, tokenizer, chat, quantization),
                        tokenizer.files() if tokenizer else [])


def is_chat_model(path: str | Path) -> bool:
    """Whether checkpoint dir `path` was tuned on chat turns (see CHAT_MARK)."""
    file = Path(path) / "generation_config.json"
    return file.is_file() and hf.read_json(file).get(CHAT_MARK) is True


def load_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
            ) -> Transformer:
    """A local checkpoint dir (mmctl's, or Hugging Face Llama / Mistral / Qwen2 / SmolLM; safetensors only) →
    Transformer in eval mode. Weight names and shapes are checked against config.json before any memory is
    allocated for the model; a quantized dir gets its quantized layers (mmctl/quant/checkpoint.py)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: checkpoint dir not found")
    cfg = ModelConfig.from_hf(hf.model_config(hf.read_json(path / "config.json")), str(path / "config.json"))
    held = sum(math.prod(shape) for shape in hf.tensor_shapes(path).values())
    quantized = qcheckpoint.read_config(path)
    factor = 16 if quantized else 2  # (a quantized file holds fewer, packed elements)
    if cfg.num_parameters() > factor * held:  # refused before even an empty model of that size is built
        raise DataError(f"{path / 'config.json'}: describes {cfg.num_parameters():,} parameters, more than "
                        f"{'twice' if factor == 2 else f'{factor} times'} what the weight files hold ({held:,})")
    with torch.device("meta"):  # shapes only: no memory, no time spent on a random init
        model = Transformer(cfg)
        layout = qcheckpoint.layout(model, quantized, hf.tensor_shapes(path)) if quantized else None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    declared = {name: t.dtype for name, t in model.state_dict().items() if not t.is_floating_point()}
    if layout:  # bitsandbytes' layers are swapped in after reading: their tensors are as stored
        expected = {k: v for k, v in expected.items() if k not in layout.replaced} | layout.stored
        declared |= layout.integers
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    skip = ["lm_head.weight"] if cfg.tie_embeddings else []  # a tied head some checkpoints store anyway
    tensors = hf.read_tensors(path, expected, dtype=dtype, device=device, skip=skip)
    free = layout.free if layout else set()
    for name, t in tensors.items():  # integer tensors only where quantized layers keep their codes
        if name not in free and (name in declared) == t.is_floating_point():
            raise DataError(f"{path}: tensor {name} is {t.dtype}, " + ("an integer" if name in declared else
                                                                         "a floating-point") + " tensor is expected")
        if name in declared and t.dtype != declared[name]:
            raise DataError(f"{path}: tensor {name} is {t.dtype}, {declared[name]} is expected")
    if layout:
        qcheckpoint.attach(model, layout, tensors, dtype, device, path)
    model.load_state_dict(tensors, strict=False, assign=True)
    if layout:
        qcheckpoint.check(model, path)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = Rotary(cfg).to(device)  # a non-persistent buffer, not in the file: computed here
    return model.eval()


def load(path: str | Path, *, device: str | torch.device = "cpu", vision: bool = False, quantized: bool = False):
    """(model, tokenizer) of a checkpoint dir, checked together — what generate, eval and the lm-eval adapter
    load, so one broken file fails every command the same way. `vision`: a VLM dir loads as its VLM
    (mmctl/models/vlm.py; it decodes text like its language model). `quantized`: a quantized checkpoint loads
    (to be scored or sampled); commands that train refuse one."""
    hf.checkpoint_dir(path)
    if is_vlm(path) and not vision:
        raise DataError(f"{path}: a vision-language model; this command takes a language model (its "
                        "language_model part is not saved on its own)")
    if not quantized and Path(path).is_dir() and quantization_of(path):
        raise DataError(f"{path}: a quantized checkpoint; this command trains or quantizes a floating-point one")
    model = load_vlm(path, device=device) if is_vlm(path) else load_lm(path, device=device)
    tok = bpe.load(path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise DataError(f"{path}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                        f"({model.cfg.vocab_size})")
    _ = tok.eos_id, hf.eos_token_ids(path)  # the document separator must exist; generation_config must parse
    if isinstance(model, VLM) and (model.image_token_id in (tok.eos_id, tok.pad_id, tok.bos_id)
                                   or model.image_token_id not in tok.backend.get_added_tokens_decoder()):
        raise DataError(f"{Path(path) / 'config.json'}: image_token_index {model.image_token_id} is "
                        f"{tok.decode([model.image_token_id])!r}, not an image placeholder token of the tokenizer")
    return model, tok


OWN = "mmctl_vlm"  # config.json model_type of a VLM whose projector Llava cannot express (linear, pixel_shuffle)


def save_vlm(model: VLM, out: str | Path, tokenizer, chat: bool = True) -> Path:
    """Write `model` as a checkpoint dir with its processor files: Llava's layout with the `mlp` projector
    (`AutoProcessor` and `AutoModelForImageTextToText` load it offline, and the processor expands `<|image|>` to
    the model's image tokens), else mmctl's own layout — the same tensor names and files, `model_type` mmctl_vlm
    and the projector in config.json (only mmctl loads it)."""
    from mmctl import recipe
    from mmctl.models.vit import processor_config

    size = model.vision.encoder.image_size
    special = tokenizer.special_token_ids()
    if model.vision.projector.kind == "mlp":
        config = llava_config(model, tokenizer)
    else:
        config = {"architectures": ["MmctlVLM"], "model_type": OWN, "vision_config": model.vision.encoder.to_hf(),
                  "text_config": {**model.language_model.cfg.to_hf(), **special},
                  "projector": recipe.to_dict(model.vision.projector), "image_token_index": model.image_token_id,
                  "image_seq_length": model.tokens_per_image, "vision_feature_layer": model.vision.feature_layer,
                  "tie_word_embeddings": model.language_model.cfg.tie_embeddings}
    processor = {"processor_class": "LlavaProcessor", "image_token": tokenizer.decode([model.image_token_id]),
                 "num_additional_image_tokens": 0, "patch_size": model.vision.encoder.patch_size,
                 "vision_feature_select_strategy": "full", "image_processor": processor_config(size)}
    files = {"config.json": config,
             "generation_config.json": generation_config(tokenizer, chat),
             "processor_config.json": processor, "preprocessor_config.json": processor_config(size)}
    if tokenizer.chat_template:  # the processor's: content parts, {"type": "image"} included (data/chat.py)
        from mmctl.data.chat import with_content_parts

        files["chat_template.json"] = {"chat_template": with_content_parts(tokenizer.chat_template,
                                                                           processor["image_token"])}
    return hf.write_dir(out, state_for_llava(model), files, tokenizer.files())


def is_vlm(path: str | Path) -> bool:
    """Whether `path` is a VLM checkpoint dir (Llava's layout or mmctl's own)."""
    file = Path(path) / "config.json"
    return file.is_file() and hf.read_json(file).get("model_type") in ("llava", OWN)


def load_vlm(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> VLM:
    """A VLM checkpoint dir → VLM in eval mode: mmctl's own layout, or Llava's with a SigLIP vision tower and a
    Llama-family LM (mmctl's, or a local Hugging Face one of that layout)."""
    path = Path(path)
    cfg = hf.read_json(path / "config.json")
    where = path / "config.json"
    vision_hf, text_hf = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    if not isinstance(vision_hf, dict) or not isinstance(text_hf, dict):
        raise DataError(f"{where}: vision_config and text_config must be mappings")
    if cfg.get("model_type") not in ("llava", OWN) or vision_hf.get("model_type") != "siglip_vision_model":
        raise DataError(f"{where}: not a VLM with a SigLIP vision tower (Llava's layout or mmctl's)")
    if cfg["model_type"] == "llava":
        if cfg.get("vision_feature_select_strategy", "default") != "full" or not isinstance(
                cfg.get("vision_feature_layer", -2), int):
            raise DataError(f"{where}: mmctl reads every patch of one vision layer (vision_feature_select_strategy "
                            "full, an integer vision_feature_layer)")
        if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
            raise DataError(f"{where}: mmctl's mlp projector is Linear → GELU → Linear with biases")
        projector = ProjectorConfig("mlp")
    else:
        p = cfg.get("projector") or {}
        if p.get("kind") not in ("mlp", "linear", "pixel_shuffle") or not isinstance(p.get("scale_factor", 2), int):
            raise DataError(f"{where}: projector is not one of mlp, linear, pixel_shuffle")
        projector = ProjectorConfig(p["kind"], p.get("scale_factor", 2))
    section = VisionSection(encoder=ViTConfig.from_hf(vision_hf, f"{where}: vision_config"), projector=projector,
                            feature_layer=cfg.get("vision_feature_layer", -2))
    problems = section.check()
    if problems:
        raise DataError(*(f"{where}: {name}: {message}" for name, message in problems))
    text = ModelConfig.from_hf({"tie_word_embeddings": cfg.get("tie_word_embeddings", False), **text_hf}, str(where))
    image = cfg.get("image_token_index", cfg.get("image_token_id"))
    if not isinstance(image, int) or isinstance(image, bool) or not 0 <= image < text.vocab_size:
        raise DataError(f"{where}: image_token_index must be a token id below the text vocab_size "
                        f"({text.vocab_size}), got {image!r}")
    with torch.device("meta"):
        model = VLM(section, Transformer(text), image)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if text.tie_embeddings:
        expected.pop("language_model.lm_head.weight")
    held = sum(math.prod(s) for s in hf.tensor_shapes(path).values())
    if sum(math.prod(s) for s in expected.values()) > 2 * held:
        raise DataError(f"{where}: describes far more parameters than the weight files hold")
    tensors = hf.read_tensors(path, expected, dtype=dtype, device=device)
    model.load_state_dict(tensors, strict=False, assign=True)
    lm = model.language_model
    if text.tie_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.model.rotary = Rotary(text).to(device)
    return model.eval()
