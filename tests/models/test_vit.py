"""The ViT against transformers' SiglipVisionModel with the same weights, and the projectors' shapes: pixel
shuffle against Idefics3's, and its inverse."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mmctl.models.projector import Projector, ProjectorConfig, pixel_shuffle, pixel_unshuffle  # noqa: E402
from mmctl.models.vit import ViT, ViTConfig  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_equal_to_transformers_siglip_vision_model():
    transformers = pytest.importorskip("transformers")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4)
    theirs = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{
        k: v for k, v in cfg.to_hf().items() if k != "model_type"})).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # random weights everywhere, biases and norms included, so nothing is checked at 0 or 1
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    ours = ViT(cfg).eval()
    missing = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not missing.missing_keys and not missing.unexpected_keys
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = theirs(pixel_values=images, output_hidden_states=True)
        torch.testing.assert_close(ours(images), out.last_hidden_state, atol=1e-5, rtol=1e-5)
        for layer in (0, 1, -2, -1, 3):
            torch.testing.assert_close(ours.features(images, layer), out.hidden_states[layer], atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        ours.features(images, 4)


def test_pixel_shuffle_is_idefics3s_and_inverts():
    transformers = pytest.importorskip("transformers")
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x = torch.randn(2, 64, 5)  # an 8 × 8 grid of 5-channel patches
    for r in (1, 2, 4):
        theirs = Idefics3Connector.pixel_shuffle(None, x, r)
        assert torch.equal(pixel_shuffle(x, r), theirs) and theirs.shape == (2, 64 // r**2, 5 * r * r)
        assert torch.equal(pixel_unshuffle(pixel_shuffle(x, r), r), x)
    # token (Y, X) of r = 2 holds patches (2Y + dy, 2X + dx), row offset first
    grid = torch.arange(64.0).view(1, 64, 1)
    assert pixel_shuffle(grid, 2)[0, 1].tolist() == [2, 3, 10, 11]
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 12, 3), 2)
    assert transformers  # imported for its skip


@pytest.mark.parametrize(("kind", "tokens"), [("mlp", 64), ("linear", 64), ("pixel_shuffle", 16)])
def test_projector_shapes(kind, tokens):
    cfg = ProjectorConfig(kind=kind, scale_factor=2)
    out = Projector(cfg, vision_size=24, text_size=40)(torch.randn(3, 64, 24))
    assert out.shape == (3, tokens, 40) and cfg.tokens(64) == tokens
