"""Image preprocessing equals transformers' SiglipImageProcessorPil; bad image files are one clear error."""

from __future__ import annotations

import pytest
import torch

from mmctl.data import images, shapes  # noqa: E402
from mmctl.errors import DataError  # noqa: E402
from mmctl.models.vit import processor_config  # noqa: E402


def test_pixels_equal_siglips_processor():
    import random

    import transformers
    from PIL import Image

    processor = transformers.SiglipImageProcessorPil(**{k: v for k, v in processor_config(24).items()
                                                        if k != "image_processor_type"})
    noise = Image.frombytes("RGB", (40, 30), bytes(random.Random(0).randrange(256) for _ in range(40 * 30 * 3)))
    for image in (shapes.render(shapes.scene(random.Random(1), "train"), 48), noise, noise.convert("L")):
        theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(images.pixels(image, 24), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("content", "message"), [(None, "not found"), (b"", "not a readable image"),
                                                   (b"not an image at all", "not a readable image"),
                                                   ("truncated", "not a readable image")])
def test_bad_images_are_named(tmp_path, content, message):
    import io

    path = tmp_path / "x.png"
    if content == "truncated":
        buffer = io.BytesIO()
        shapes.render([], 64).save(buffer, format="PNG")
        content = buffer.getvalue()[:-30]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        images.load(path)
    assert str(path) in str(error.value)
