"""Supervised stage 0 for the built-in shapes: linear heads read each grid cell's colour and kind, and the number
of shapes, off the ViT's patch features — the features the projector will read (`vision.feature_layer`).

Contrastive pretraining needs many captions per concept and a large batch before an encoder separates what a
caption names; the shapes generator knows every label exactly, so the encoder can be taught them directly, as an
ImageNet classifier is before a VLM borrows it. The heads are linear on purpose: what they can read, the
projector (at least as wide) can read too, and `mmctl/evals/probe.py` measures the same thing on a frozen encoder.
The heads are thrown away afterwards.

Cells: the patch grid (g × g) is average-pooled to the scene's 3 × 3 grid — with 48-pixel images and 16-pixel
patches one patch is one cell — and the count is read from the mean of all patches. (A fourth head naming each
cell's place, so that a token says where it is, took position from 0.33 to 0.63 but colour and shape to chance
at the tiny recipe's budget — one seed, 2026-12-07 — and was left out.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmctl.models.vit import ViT, init_weights

GRID = 3


def pool(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features (B, g·g, C) → (per-cell features (B, 9, C), whole-image mean (B, C))."""
    b, n, c = features.shape
    g = int(round(n ** 0.5))
    grid = features.transpose(1, 2).reshape(b, c, g, g)
    return F.adaptive_avg_pool2d(grid, GRID).flatten(2).transpose(1, 2), features.mean(1)


class CellHeads(nn.Module):
    """The ViT being trained and three linear heads: cell colour, cell kind (each class 0 = empty) and the count
    (class 0 = one shape); the class counts are the scene generator's (`mmctl.data.shapes`)."""

    def __init__(self, vision: ViT, feature_layer: int, colours: int, kinds: int, counts: int):
        super().__init__()
        self.vision_tower = vision
        self.feature_layer = feature_layer
        width = vision.cfg.hidden_size
        self.colour = nn.Linear(width, colours)
        self.kind = nn.Linear(width, kinds)
        self.count = nn.Linear(width, counts)
        for head in (self.colour, self.kind, self.count):
            init_weights(head)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits: colour (B, 9, colours), kind (B, 9, kinds), count (B, counts)."""
        cells, whole = pool(self.vision_tower.features(pixels, self.feature_layer))
        return self.colour(cells), self.kind(cells), self.count(whole)


def loss(logits: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the images' 19 labels (`mmctl.data.shapes.labels`: 9 colours, 9 kinds, count)."""
    colour, kind, count = (x.float() for x in logits)
    return (F.cross_entropy(colour.flatten(0, 1), labels[:, :9].flatten(), reduction="sum")
            + F.cross_entropy(kind.flatten(0, 1), labels[:, 9:18].flatten(), reduction="sum")
            + F.cross_entropy(count, labels[:, 18], reduction="sum"))


def accuracy(logits: tuple[torch.Tensor, ...], labels: torch.Tensor) -> dict[str, float]:
    """Colour and kind accuracy on the occupied cells (an empty cell is the easy majority), count accuracy."""
    colour, kind, count = logits
    occupied = labels[:, :9] > 0
    return {"cell_colour": float((colour.argmax(-1) == labels[:, :9])[occupied].float().mean()),
            "cell_shape": float((kind.argmax(-1) == labels[:, 9:18])[occupied].float().mean()),
            "count": float((count.argmax(-1) == labels[:, 18]).float().mean())}
