"""Attention, seen: where a trained model looks. A language model's attention weights per layer and head on its
own sample prompt and greedy continuation, and a VLM's attention from its answer tokens to the image's patches.

The weights are what the model computes: each attention layer is asked to keep them (`Attention.record` in
`mmctl/models/transformer.py`, tested equal to transformers' `output_attentions`) for one forward pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

CONTINUATION = 12  # greedy tokens after the prompt, so the pattern shows the model reading its own words


def _recording(model, on: bool) -> None:
    lm = getattr(model, "language_model", model)
    for layer in lm.model.layers:
        layer.self_attn.record = on
        if not on:
            layer.self_attn.weights = None


def _weights(model) -> torch.Tensor:
    """(layers, heads, T, T) of the last forward's first row."""
    lm = getattr(model, "language_model", model)
    return torch.stack([layer.self_attn.weights[0] for layer in lm.model.layers]).float()


def language_model(path: Path, prompt: str) -> dict:
    """{tokens, weights (layers, heads, T, T)} of a checkpoint dir on `prompt` and its greedy continuation (a chat
    model is asked `prompt` as a user turn)."""
    from mmctl import checkpoints
    from mmctl.data.chat import prompt_ids, stop_ids
    from mmctl.generate import SamplingConfig, generate

    model, tok = checkpoints.load(path)
    chat = checkpoints.is_chat_model(path)
    ids = prompt_ids([{"role": "user", "content": prompt}], tok) if chat else tok.encode(prompt)
    done = generate(model, [ids], SamplingConfig(max_new_tokens=CONTINUATION),
                    stop_token_ids=stop_ids(tok) if chat else [tok.eos_id])
    ids = (ids + done.completions[0].ids)[-model.cfg.max_position_embeddings:]
    _recording(model, True)
    with torch.no_grad():
        model(torch.tensor([ids]))
    weights = _weights(model)
    _recording(model, False)
    return {"tokens": [tok.decode([i]) for i in ids], "weights": weights}


def vision_language_model(path: Path, examples: int = 3) -> list[dict]:
    """For `examples` held-out shapes questions: {image (PIL), question, answer (the model's greedy one), expected,
    grid (layers, rows, cols)}: each layer's attention, while the model says its answer, to the image's tokens —
    averaged over heads and the answer's tokens, laid out as the image's patch grid."""
    from mmctl import checkpoints
    from mmctl.data import images, vqa
    from mmctl.data import shapes as generator
    from mmctl.data.chat import stop_ids
    from mmctl.data.synthetic import BUILTIN_SEED
    from mmctl.generate import SamplingConfig, completion_text, generate

    model, tok = checkpoints.load(path, vision=True)
    size = model.vision.encoder.image_size
    side = round(model.tokens_per_image ** 0.5)
    if side * side != model.tokens_per_image:
        raise ValueError(f"its {model.tokens_per_image} image tokens are not a square grid")
    out = []
    for item in generator.items(examples, BUILTIN_SEED, "train", size):
        pixels = images.pixels(item["image"], size)
        prompt = vqa.prompt(item["question"], tok, model.image_token_id, model.tokens_per_image)
        done = generate(model, [prompt], SamplingConfig(max_new_tokens=8), stop_token_ids=stop_ids(tok),
                        pixels=pixels[None]).completions[0]
        ids = torch.tensor([prompt + done.ids])
        _recording(model, True)
        with torch.no_grad():
            model(ids, pixels[None])
        weights = _weights(model)  # (L, H, T, T)
        _recording(model, False)
        image = (ids[0] == model.image_token_id).nonzero().flatten()
        saying = torch.arange(len(prompt) - 1, ids.shape[1] - 1)  # the positions whose next token is the answer's
        to_image = weights[:, :, saying][:, :, :, image].mean(dim=(1, 2))  # (L, image tokens)
        out.append({"image": item["image"], "question": item["question"], "expected": item["answer"],
                    "answer": completion_text(tok, done).strip(), "grid": to_image.view(len(to_image), side, side)})
    return out
