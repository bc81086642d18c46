"""Images for the VLM: read (an unreadable or corrupt file is one error naming it — never a traceback, never a
silent skip), then made into pixels as SigLIP's image processor makes them, so a model trained here and its
exported processor (transformers' `SiglipImageProcessorPil`) see the same numbers:

    RGB → resize to size × size (bicubic) → ÷ 255 → (x − 0.5) / 0.5, i.e. values in [−1, 1], channels first.
"""

from __future__ import annotations

from pathlib import Path

from mmctl.errors import DataError
from mmctl.models.vit import MEAN, STD


def load(path: str | Path):
    """A PIL image, fully decoded (a truncated file fails here, not later in a batch)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large to decode safely ({e})") from None


def pixels(image, size: int):
    """(3, size, size) float32 tensor of a PIL image, preprocessed as SigLIP's processor does."""
    import numpy as np
    import torch
    from PIL import Image

    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()
