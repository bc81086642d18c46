"""The vision side against transformers with the same weights: the ViT as SiglipVisionModel, pixel shuffle as
Idefics3's (and its inverse), the whole VLM as LlavaForConditionalGeneration."""

from __future__ import annotations

import pytest
import torch

from mmctl.models.projector import ProjectorConfig, make, pixel_shuffle, pixel_unshuffle  # noqa: E402
from mmctl.models.vit import ViT, ViTConfig  # noqa: E402
from tests.models import one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_equal_to_transformers_siglip_vision_model():
    import transformers
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
    import transformers
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
    out = make(cfg, vision_size=24, text_size=40)(torch.randn(3, 64, 24))
    assert out.shape == (3, tokens, 40) and cfg.tokens(64) == tokens


def test_a_vlm_equals_transformers_llava_with_the_same_weights(tmp_path):
    """mmctl's VLM saved under Llava's names loads in LlavaForConditionalGeneration with the same logits; the
    placeholder expands to one slot per image token, and no label ever targets an image slot."""
    import json

    import transformers
    from safetensors.torch import save_file

    from mmctl.models import vlm
    from mmctl.models.config import ModelConfig
    from mmctl.models.transformer import Transformer

    torch.manual_seed(0)
    section = vlm.VisionSection(encoder=ViTConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64,
                                                  num_layers=3, num_heads=4), feature_layer=-2)
    lm = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, max_position_embeddings=64))
    model = vlm.VLM(section, lm, image_token_id=7).eval()
    with torch.no_grad():
        for p in model.vision_tower.parameters():
            p.normal_(0, 0.2)
    (tmp_path / "m").mkdir()
    save_file({k: v.contiguous() for k, v in vlm.state_for_llava(model).items()}, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps(vlm.llava_config(model)))
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()

    assert model.tokens_per_image == 16
    ids = torch.tensor([vlm.expand([1, 7, 9, 10, 11], 7, 16), vlm.expand([2, 3, 7, 12, 13], 7, 16)])
    assert ids.shape == (2, 20) and int((ids == 7).sum()) == 32
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(ids, pixels)
        reference = theirs(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    labels = vlm.labels_for(ids, 7)
    assert not (labels == 7).any() and int((labels == vlm.IGNORE).sum()) == 32  # every slot is some target
    with pytest.raises(ValueError, match="image slots"):
        model(ids[:, :10], pixels)


def test_the_exported_llava_dir_loads_in_transformers_with_its_processor(checkpoint, tmp_path):
    """save_vlm → AutoProcessor expands <|image|> to the image's tokens and preprocesses as mmctl does, and
    AutoModelForImageTextToText gives mmctl's logits; load_vlm reads the dir back to the same model."""
    import random

    import transformers

    from mmctl import checkpoints
    from mmctl.data import images, shapes
    from mmctl.data.chat import render
    from mmctl.models import vlm
    from mmctl.tokenizer import bpe

    torch.manual_seed(0)
    tok = bpe.load(checkpoint)
    lm = checkpoints.load_lm(checkpoint)
    section = vlm.VisionSection(encoder=ViTConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=64,
                                                  num_layers=2, num_heads=4))
    model = vlm.VLM(section, lm, tok.token_id(bpe.IMAGE)).eval()
    out = checkpoints.save_vlm(model, tmp_path / "llava", tok)

    processor = transformers.AutoProcessor.from_pretrained(out)
    theirs = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    image = shapes.render(shapes.scene(random.Random(0), "train"), 64)
    text = render([{"role": "user", "content": f"{bpe.IMAGE}\\nWhat colour is the circle?"}], tok.chat_template,
                  add_generation_prompt=True)
    inputs = processor(text=text, images=image, return_tensors="pt")
    ids = torch.tensor([vlm.expand(tok.encode_with_offsets(text, special=True)[0], model.image_token_id,
                                   model.tokens_per_image)])
    assert torch.equal(inputs["input_ids"], ids)
    pixels = images.pixels(image, 32)[None]
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        ours = model(ids, pixels)
        torch.testing.assert_close(theirs(**inputs).logits, ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(checkpoints.load_vlm(out)(ids, pixels), ours, atol=0, rtol=0)
    assert checkpoints.is_vlm(out) and not checkpoints.is_vlm(checkpoint)

    # a newcomer's script: the processor's chat template takes {"type": "image"} content, as the HF docs show, and
    # transformers' greedy answer is mmctl's
    from mmctl import hf
    from mmctl.data import vqa
    from mmctl.generate import SamplingConfig, generate

    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "\nWhat colour is the circle?"}]}]
    assert messages == vqa.messages("What colour is the circle?")
    templated = processor.apply_chat_template(messages, add_generation_prompt=True)
    asked = processor(text=templated, images=image, return_tensors="pt")
    assert asked["input_ids"][0].tolist() == vqa.prompt("What colour is the circle?", tok, model.image_token_id,
                                                        model.tokens_per_image)
    said = theirs.generate(**asked, max_new_tokens=6, do_sample=False)[0, asked["input_ids"].shape[1]:].tolist()
    mine = generate(model, [asked["input_ids"][0].tolist()], SamplingConfig(max_new_tokens=6),
                    stop_token_ids=hf.eos_token_ids(out), pixels=pixels).completions[0].ids
    assert said[:len(mine)] == mine


def test_a_vlm_decodes_with_its_image_as_a_full_forward_pass_would():
    """Greedy decoding with the KV cache (image in the prefill, left-padded batch) equals argmax of a full
    forward pass over each prompt alone, token by token."""
    from mmctl.generate import SamplingConfig, generate
    from mmctl.models import vlm
    from mmctl.models.config import ModelConfig
    from mmctl.models.transformer import Transformer

    torch.manual_seed(0)
    section = vlm.VisionSection(encoder=ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                                  num_layers=2, num_heads=2),
                                projector=ProjectorConfig(kind="pixel_shuffle", scale_factor=2))
    lm = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, max_position_embeddings=64))
    model = vlm.VLM(section, lm, image_token_id=7).eval()
    prompts = [vlm.expand([1, 7, 9], 7, 4), vlm.expand([2, 3, 4, 7, 12, 13], 7, 4)]
    pixels = torch.randn(2, 3, 16, 16)
    out = generate(model, prompts, SamplingConfig(max_new_tokens=6), pixels=pixels)
    for prompt, image, completion in zip(prompts, pixels, out.completions, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids]), image[None])[0, -1].argmax()))
        assert completion.ids == ids[len(prompt):]


def test_contrastive_losses_and_recall_by_hand():
    import math

    from mmctl.models.contrastive import clip_loss, recall_at_1, siglip_loss

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0], [-2.0, 0.5, 1.5]])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -sum(math.log(sig(logits[i, j].item() * (1 if i == j else -1))) for i in range(3) for j in range(3))
    assert float(siglip_loss(logits)) == pytest.approx(expected, rel=1e-6)
    rows = -sum(math.log(math.exp(logits[i, i]) / sum(math.exp(v) for v in logits[i].tolist())) for i in range(3))
    cols = -sum(math.log(math.exp(logits[i, i]) / sum(math.exp(v) for v in logits[:, i].tolist())) for i in range(3))
    assert float(clip_loss(logits)) == pytest.approx((rows + cols) / 2, rel=1e-6)
    assert recall_at_1(logits) == (pytest.approx(2 / 3), pytest.approx(2 / 3))  # row 1 picks 2; column 1 picks 1


def test_the_text_tower_pools_only_the_captions_tokens():
    from mmctl.models.contrastive import Contrastive

    torch.manual_seed(0)
    pair = Contrastive(ViT(ViTConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1,
                                     num_heads=2)), vocab_size=50, max_len=8).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 9, 9]])
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        text = pair.text_tower(ids, valid)
        assert text.shape == (2, 32) and not torch.allclose(text[0], text[1])
        logits = pair(torch.randn(3, 3, 16, 16), ids[:1].expand(3, -1), valid[:1].expand(3, -1))
    assert logits.shape == (3, 3)


def test_a_pretrained_siglip_dir_loads_as_the_vit(tmp_path):
    """SiglipVisionModel's and SiglipModel's save_pretrained dirs both load (the text tower and pooling head left
    out) to the same features as transformers; a VLM built on one takes its config."""
    import transformers

    from mmctl.errors import DataError
    from mmctl.models.projector import ProjectorConfig
    from mmctl.models.transformer import ModelConfig, Transformer
    from mmctl.models.vit import load_pretrained
    from mmctl.models.vlm import VLM, VisionSection

    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4)
    vision = {k: v for k, v in cfg.to_hf().items() if k not in ("model_type", "vision_use_head")}
    torch.manual_seed(0)
    whole = transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=vision, text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 2, "vocab_size": 50})).eval()
    whole.save_pretrained(tmp_path / "siglip")
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)).eval()
    tower.save_pretrained(tmp_path / "tower")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for theirs, where in ((whole.vision_model, "siglip"), (tower, "tower")):
            ours = load_pretrained(tmp_path / where).eval()
            assert ours.cfg == cfg
            out = theirs(pixel_values=images, output_hidden_states=True)
            torch.testing.assert_close(ours.features(images, -1), out.hidden_states[-1], atol=1e-5, rtol=1e-5)
    lm = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                 num_kv_heads=2, max_position_embeddings=64))
    model = VLM(VisionSection(projector=ProjectorConfig("mlp"), pretrained=str(tmp_path / "tower")), lm, 5)
    assert model.vision.encoder == cfg and model.tokens_per_image == 16
    with pytest.raises(DataError, match="not a SigLIP checkpoint"):
        load_pretrained(_llama_dir(tmp_path))


def _llama_dir(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    return tmp_path / "llama"


def test_cells_pool_the_patch_grid_to_the_scene_grid():
    from mmctl.models.cells import pool

    x = torch.randn(2, 36, 5)  # a 6 × 6 patch grid: each scene cell is 2 × 2 patches
    cells, whole = pool(x)
    grid = x.reshape(2, 6, 6, 5)
    assert cells.shape == (2, 9, 5)
    torch.testing.assert_close(cells[:, 5], grid[:, 2:4, 4:6].mean((1, 2)))  # the middle right cell
    torch.testing.assert_close(whole, x.mean(1))
    same = torch.randn(1, 9, 5)
    torch.testing.assert_close(pool(same)[0], same)  # one patch per cell: the patches themselves


def test_cell_heads_loss_and_accuracy_by_hand():
    import torch.nn.functional as F

    from mmctl.models.cells import accuracy, loss

    torch.manual_seed(0)
    colour, kind, count = torch.randn(2, 9, 6), torch.randn(2, 9, 4), torch.randn(2, 3)
    y = torch.randint(0, 4, (2, 19))
    y[:, 18] = torch.tensor([0, 2])
    expected = sum(F.cross_entropy(colour[b, c], y[b, c]) + F.cross_entropy(kind[b, c], y[b, 9 + c])
                   for b in range(2) for c in range(9)) + F.cross_entropy(count, y[:, 18], reduction="sum")
    torch.testing.assert_close(loss((colour, kind, count), y), expected)
    y[:, :9] = 0  # all empty but two cells: accuracy counts only the occupied ones
    y[0, 4], y[1, 0] = colour[0, 4].argmax(), (colour[1, 0].argmax() + 1) % 6 or 1
    assert accuracy((colour, kind, count), y)["cell_colour"] == 0.5


def test_the_linear_probe_reads_what_the_features_hold_and_no_more():
    """Features that spell out each cell's colour and kind probe perfectly; features blind to the image probe at
    about chance — the probe itself invents nothing."""
    from mmctl.data import shapes
    from mmctl.evals.probe import probe

    class Spelled(torch.nn.Module):  # each patch: its cell's colour and kind one-hot, read back from the pixels
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def features(self, pixels, layer):
            from mmctl.data.images import MEAN, STD

            rgb = (pixels * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255
            size = pixels.shape[-1]
            out = []
            for cell in range(9):
                r, c = divmod(cell, 3)
                patch = rgb[:, :, r * size // 3:(r + 1) * size // 3, c * size // 3:(c + 1) * size // 3]
                centre = patch[:, :, patch.shape[2] // 2, patch.shape[3] // 2]  # the shape's colour, or background
                colour = torch.stack([(centre - torch.tensor(v, dtype=torch.float32)).abs().sum(1) < 60
                                      for v in shapes.COLOURS.values()], 1).float()
                out.append(torch.cat([colour, patch.mean((2, 3)) / 255], 1))
            return torch.stack(out, 1)

    class Blind(Spelled):
        def features(self, pixels, layer):
            return torch.randn(len(pixels), 9, 16)

    torch.manual_seed(0)
    seen = probe(Spelled(), -1, 48, train=300, test=200)
    assert seen["cell_colour"] > 0.95
    blind = probe(Blind(), -1, 48, train=300, test=200)
    assert blind["cell_colour"] < 0.4 and blind["cell_shape"] < 0.6 and blind["count"] < 0.55
