"""The vision-language model: a ViT reads the image, a projector turns its patch features into "image tokens" of
the LM's width, and the unchanged language model reads them in place of placeholder tokens (LLaVA, nanoVLM).

    prompt ids   …  <|image|> × T  …  question tokens  …           (`expand`: one placeholder → T slots)
    embeddings   x = embed_tokens(ids)                              (B, S, C_lm)
    image        f = projector(vit.features(pixels, feature_layer)) (n_images, T, C_lm)
    fused        x[ids == <|image|>] = f, image after image, in order
    logits       = language_model(inputs_embeds=x)

Why it fuses there: the decoder needs no change at all — an image token is just a vector in its residual stream
where a word embedding would have been, attended to causally like any other token. Why the projector's output
width is the LM's hidden size: because of that. Why the loss is on text only: the image slots have no "next
token" to predict (their targets would be placeholder ids the model can never produce and must not learn to);
`labels_for` masks them, and the prompt too when instruction tuning.

State-dict names are transformers' Llava checkpoint names (`vision_tower.*` as SiglipVisionModel,
`multi_modal_projector.linear_1/linear_2`, `language_model.model.*`), so a VLM with the `mlp` projector saves as
a directory `LlavaForConditionalGeneration.from_pretrained` loads (`save_vlm`; the other projectors save in
mmctl's own layout).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from mmctl.errors import UsageError
from mmctl.models import projector
from mmctl.models.config import ModelConfig
from mmctl.models.projector import ProjectorConfig
from mmctl.models.transformer import Transformer
from mmctl.models.vit import ViT, ViTConfig, init_weights, load_pretrained
from mmctl.recipe import option

IGNORE = -100  # a label that the loss skips (PyTorch's cross_entropy ignore_index)


@dataclass
class VisionSection:
    """How the image reaches the LM; usable directly as a recipe section."""

    encoder: ViTConfig = option(ViTConfig, "the ViT (mmctl/models/vit.py)")
    projector: ProjectorConfig = option(ProjectorConfig, "the projector (mmctl/models/projector.py)")
    feature_layer: int = option(-1, "which ViT block's output the projector reads (−1 the last, −2 the one "
                                    "before, as LLaVA's vision_feature_layer)")
    pretrained: str | None = option(None, "a local SigLIP checkpoint dir (SiglipVisionModel or SiglipModel): the ViT "
                                          "starts from its weights and takes its config (encoder is then ignored)")

    def check(self) -> list[tuple[str, str]]:
        if self.pretrained:  # the encoder is the checkpoint's, checked when it loads
            return []
        side, layers = self.encoder.image_size // self.encoder.patch_size, self.encoder.num_layers
        problems = []
        if self.projector.kind == "pixel_shuffle" and side % self.projector.scale_factor:
            problems.append(("projector.scale_factor", f"{self.projector.scale_factor} does not divide the "
                                                       f"{side} × {side} patch grid"))
        if not -(layers + 1) <= self.feature_layer <= layers:
            problems.append(("feature_layer", f"{self.feature_layer}: the ViT has hidden states 0..{layers} "
                                              f"(or −1..−{layers + 1})"))
        return problems


class VLM(nn.Module):
    def __init__(self, vision: VisionSection, language_model: Transformer, image_token_id: int):
        super().__init__()
        if vision.pretrained:  # the encoder's shape is the checkpoint's: checked against the rest now
            source = vision.pretrained
            self.vision_tower = load_pretrained(source)
            vision = replace(vision, encoder=self.vision_tower.cfg, pretrained=None)
            problems = vision.check()
            if problems:
                raise UsageError(*[f"vision.{field}: {message} (with the ViT of {source})"
                                  for field, message in problems])
        else:
            self.vision_tower = ViT(vision.encoder)
        self.vision = vision
        self.image_token_id = image_token_id
        self.multi_modal_projector = projector.make(vision.projector, vision.encoder.hidden_size,
                                                 language_model.cfg.hidden_size)
        init_weights(self.multi_modal_projector)
        self.language_model = language_model

    @property
    def tokens_per_image(self) -> int:
        return self.vision.projector.tokens(self.vision.encoder.num_patches)

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def cfg(self) -> ModelConfig:
        """The language model's config: what decoding needs (context, vocabulary)."""
        return self.language_model.cfg

    def new_cache(self, batch_size: int, max_len: int):
        return self.language_model.new_cache(batch_size, max_len)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) → (n_images, tokens_per_image, C_lm)."""
        return self.multi_modal_projector(self.vision_tower.features(pixels, self.vision.feature_layer))

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """The LM's input embeddings with each image's tokens written into its placeholder slots."""
        x = self.language_model.model.embed_tokens(input_ids)
        slots = input_ids == self.image_token_id
        n_slots = int(slots.sum())
        if pixels is None or len(pixels) == 0:
            if n_slots:
                raise ValueError(f"{n_slots} image slots but no image")
            return x
        images = self.image_embeddings(pixels).to(x.dtype)
        if n_slots != images.shape[0] * images.shape[1]:
            raise ValueError(f"{n_slots} image slots for {images.shape[0]} image(s) of {images.shape[1]} tokens each "
                             "(expand each <|image|> with `expand` first)")
        return x.masked_scatter(slots.unsqueeze(-1), images)  # fills the slots in reading order

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Logits (B, S, V); `kwargs` go to the language model (attention_mask, position_ids, cache, …)."""
        return self.language_model(inputs_embeds=self.embed(input_ids, pixels), **kwargs)


def expand(ids: list[int], image_token_id: int, tokens_per_image: int) -> list[int]:
    """Each `<|image|>` id in a prompt → `tokens_per_image` of them: one slot per image token."""
    out: list[int] = []
    for t in ids:
        out += [t] * tokens_per_image if t == image_token_id else [t]
    return out


def labels_for(ids: torch.Tensor, image_token_id: int, trained: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token targets ids[:, 1:] with IGNORE wherever the target is an image slot or, given `trained` (B, S−1),
    untrained (the question, in instruction tuning)."""
    labels = ids[:, 1:].clone()
    labels[labels == image_token_id] = IGNORE
    if trained is not None:
        labels[~trained.bool()] = IGNORE
    return labels


def llava_config(model: VLM, tokenizer=None) -> dict:
    """config.json of `model` as transformers' LlavaConfig (the `mlp` projector only)."""
    if model.vision.projector.kind != "mlp":
        raise ValueError(f"a {model.vision.projector.kind} projector has no Llava layout (only mlp does)")
    text = model.language_model.cfg.to_hf()
    special = tokenizer.special_token_ids() if tokenizer is not None else {}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "vision_config": model.vision.encoder.to_hf(), "text_config": {**text, **special},
            "image_token_index": model.image_token_id, "image_seq_length": model.tokens_per_image,
            "vision_feature_layer": model.vision.feature_layer, "vision_feature_select_strategy": "full",
            "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
            "tie_word_embeddings": model.language_model.cfg.tie_embeddings,
            "torch_dtype": str(model.language_model.dtype).removeprefix("torch.")}


def state_for_llava(model: VLM) -> dict[str, torch.Tensor]:
    """The weights under Llava's checkpoint names (a tied head stored once, as transformers does)."""
    state = model.state_dict()
    if model.language_model.cfg.tie_embeddings:
        state.pop("language_model.lm_head.weight")
    return state
