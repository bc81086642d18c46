"""Images for the VLM: read (an unreadable or corrupt file is one error naming it — never a traceback, never a
silent skip), then made into pixels as SigLIP's image processor makes them, so a model trained here and its
exported processor (transformers' `SiglipImageProcessorPil`) see the same numbers:

    RGB → resize to size × size (bicubic) → ÷ 255 → (x − 0.5) / 0.5, i.e. values in [−1, 1], channels first.
"""

from __future__ import annotations

import io
from pathlib import Path

from mmctl.artifacts import regular_file
from mmctl.errors import DataError
from mmctl.models.vit import MEAN, STD

MAX_PIXELS = 50_000_000  # an image claiming more (a 7,000 × 7,000 photo) is refused from its header, undecoded


def load(path: str | Path | io.BytesIO, name: str | None = None):
    """A PIL image, fully decoded (a truncated file fails here, not later in a batch). A path must be a regular
    file (a FIFO or a device would block forever); an image whose header claims more than MAX_PIXELS is refused
    before it is decoded (a decompression bomb). `name`: what errors call an in-memory image."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(path)
    if not isinstance(path, io.BytesIO):
        if not Path(path).exists():
            raise DataError(f"{name}: image not found")
        path = regular_file(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{width} × {height}")
            image.load()
            return image.copy()
    except Image.DecompressionBombError as e:  # (PIL raises it itself, from the header, past twice its own limit)
        size = str(e) if "×" in str(e) else "more"
        raise DataError(f"{name}: the image claims {size} pixels, more than the {MAX_PIXELS:,} mmctl decodes (a "
                        "decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def pixels(image, size: int):
    """(3, size, size) float32 tensor of a PIL image, preprocessed as SigLIP's processor does."""
    import numpy as np
    import torch
    from PIL import Image

    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()
