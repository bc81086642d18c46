"""Contrastive image–text pretraining of the ViT (SigLIP, Zhai et al. 2023): the encoder learns to tell images
apart by matching each to its caption among the batch's, before any language model reads it.

A small text tower embeds each caption; each image is its mean-pooled patch features (after post_layernorm);
both are projected to one width and L2-normalised. SigLIP scores every image–caption pair of the batch on its
own, as a binary question "do these belong together?":

    logits_ij = exp(t) · ⟨img_i, txt_j⟩ + b          (t, b learned; SigLIP starts them at log 10 and −10)
    loss      = −1/B · Σ_i Σ_j log σ(z_ij · logits_ij),  z_ij = +1 on the diagonal, −1 elsewhere

(CLIP's InfoNCE instead takes a softmax over each row and column: `loss: clip`). Retrieval accuracy R@1 — the
share of images whose best-scoring caption is their own, and of captions whose best image is theirs — says how
well the encoder separates what the captions name. The text tower is thrown away afterwards, as SigLIP's is for
a VLM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmctl.models.vit import Block as VitBlock
from mmctl.models.vit import ViT, ViTConfig, init_weights


class TextTower(nn.Module):
    """Token embeddings + learned positions → a few bidirectional blocks → mean over the caption's tokens."""

    def __init__(self, vocab_size: int, max_len: int, cfg: ViTConfig, num_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(max_len, cfg.hidden_size)
        self.layers = nn.ModuleList(VitBlock(cfg) for _ in range(num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        init_weights(self)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids, valid (B, T) → (B, C); padding is attended to but not pooled."""
        x = self.embed(ids) + self.position.weight[: ids.shape[1]]
        for block in self.layers:
            x = block(x)
        x = self.norm(x)
        w = valid.unsqueeze(-1).to(x.dtype)
        return (x * w).sum(1) / w.sum(1).clamp(min=1)


class Contrastive(nn.Module):
    """The ViT being trained, a text tower, two projections to a shared width, and SigLIP's t and b."""

    def __init__(self, vision: ViT, vocab_size: int, max_len: int, width: int = 128, loss: str = "siglip"):
        super().__init__()
        self.vision_tower = vision
        self.text_tower = TextTower(vocab_size, max_len, vision.cfg)
        self.image_proj = nn.Linear(vision.cfg.hidden_size, width, bias=False)
        self.text_proj = nn.Linear(vision.cfg.hidden_size, width, bias=False)
        init_weights(self.image_proj)
        init_weights(self.text_proj)
        self.loss = loss
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0 if loss == "siglip" else 0.0), requires_grad=loss == "siglip")

    def embeddings(self, pixels: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor):
        img = self.vision_tower(pixels).mean(1)  # post_layernorm'd patches, pooled
        return (F.normalize(self.image_proj(img).float(), dim=-1),
                F.normalize(self.text_proj(self.text_tower(ids, valid)).float(), dim=-1))

    def forward(self, pixels, ids, valid) -> torch.Tensor:
        """Logits (B images, B captions)."""
        img, txt = self.embeddings(pixels, ids, valid)
        return self.log_scale.exp() * img @ txt.T + self.bias  # (B images, B captions)


def siglip_loss(logits: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, summed over the batch's images (each image's B pair terms)."""
    z = 2 * torch.eye(len(logits), device=logits.device) - 1
    return -F.logsigmoid(z * logits).sum()


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, summed over the batch's images (image → text and text → image, halved)."""
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(logits.T, target, reduction="sum")) / 2


def recall_at_1(logits: torch.Tensor) -> tuple[float, float]:
    """(image → text, text → image) R@1: the share whose best match is its own pair."""
    target = torch.arange(len(logits), device=logits.device)
    return (float((logits.argmax(1) == target).float().mean()), float((logits.argmax(0) == target).float().mean()))
