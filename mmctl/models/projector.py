"""Projectors: the bridge from the vision encoder's patch features into the language model's embedding space.

A VLM writes each image as a run of "image tokens" in the LM's input: vectors of the LM's width C_lm, one per
(possibly merged) patch. The projector makes them from the ViT's patch features (B, N, C_vit):

- `mlp` (LLaVA-1.5): Linear(C_vit → C_lm) → GELU → Linear(C_lm → C_lm); N image tokens. transformers'
  `LlavaMultiModalProjector` (linear_1, linear_2), so a VLM with it exports as a Llava checkpoint.
- `linear` (LLaVA-1): one Linear(C_vit → C_lm); N image tokens.
- `pixel_shuffle` (Idefics3 / SmolVLM / nanoVLM): fold each r × r block of neighbouring patches into one vector
  of r² · C_vit channels, then one Linear(r² · C_vit → C_lm, no bias): N / r² image tokens — r = 2 makes an image
  4× cheaper for the LM at the same encoder resolution, trading spatial resolution for channels. The fold is
  transformers' `Idefics3Connector.pixel_shuffle` (channels ordered row offset, column offset, feature).

Why the widths are what they are: the output must be C_lm because the image tokens sit in the LM's residual
stream beside word embeddings; the input is whatever the encoder makes. The hidden width of `mlp` follows LLaVA
(C_lm): the projector is a few percent of the VLM's parameters and trains first, alone (align-vision stage 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmctl.recipe import option


@dataclass
class ProjectorConfig:
    kind: Literal["mlp", "linear", "pixel_shuffle"] = option(
        "mlp", "mlp (LLaVA-1.5: Linear → GELU → Linear) | linear | pixel_shuffle (fold r × r patches, then Linear)")
    scale_factor: int = option(2, "pixel_shuffle: r, the side of the folded block (r² fewer image tokens)", ge=1)

    def tokens(self, num_patches: int) -> int:
        """Image tokens the LM sees for `num_patches` patches."""
        return num_patches // self.scale_factor**2 if self.kind == "pixel_shuffle" else num_patches


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, N, C) patch features of a √N × √N grid → (B, N / r², r² · C): each r × r block becomes one token."""
    B, N, C = x.shape
    side = int(round(N**0.5))
    if side * side != N or side % r:
        raise ValueError(f"pixel_shuffle needs a square grid whose side divides by {r}; got {N} patches")
    grid = x.view(B, side // r, r, side // r, r, C)  # [Y, dy, X, dx, c]: patch (Y r + dy, X r + dx)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(B, N // r**2, r * r * C)


def pixel_unshuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """The inverse of `pixel_shuffle`: (B, N / r², r² · C) → (B, N, C)."""
    B, M, RC = x.shape
    C, blocks = RC // (r * r), int(round(M**0.5))
    grid = x.view(B, blocks, blocks, r, r, C).permute(0, 1, 3, 2, 4, 5)  # [Y, dy, X, dx, c]
    return grid.reshape(B, M * r * r, C)


class MLPProjector(nn.Module):
    """LLaVA-1.5's: Linear(C_vit → C_lm) → GELU → Linear(C_lm → C_lm); transformers' LlavaMultiModalProjector."""

    def __init__(self, cfg: ProjectorConfig, vision_size: int, text_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.linear_2 = nn.Linear(text_size, text_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C_vit) → (B, N, C_lm)."""
        return self.linear_2(F.gelu(self.linear_1(features)))


class LinearProjector(nn.Module):
    """LLaVA-1's: one Linear(C_vit → C_lm)."""

    def __init__(self, cfg: ProjectorConfig, vision_size: int, text_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_size, text_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C_vit) → (B, N, C_lm)."""
        return self.linear_1(features)


class PixelShuffleProjector(nn.Module):
    """Idefics3's / nanoVLM's: r × r neighbouring patches folded into one vector, then Linear(r² · C_vit → C_lm)."""

    def __init__(self, cfg: ProjectorConfig, vision_size: int, text_size: int):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        self.proj = nn.Linear(vision_size * cfg.scale_factor**2, text_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, C_vit) → (B, N / r², C_lm)."""
        return self.proj(pixel_shuffle(features, self.scale_factor))


PROJECTORS = {"mlp": MLPProjector, "linear": LinearProjector, "pixel_shuffle": PixelShuffleProjector}


def make(cfg: ProjectorConfig, vision_size: int, text_size: int) -> nn.Module:
    """The projector `cfg.kind` names (its parameters carry transformers' names: linear_1, linear_2; proj)."""
    return PROJECTORS[cfg.kind](cfg, vision_size, text_size)
