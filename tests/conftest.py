import os

import pytest

# Tests never touch the network: a hub name would otherwise retry for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A small random Llama checkpoint dir with a trained tokenizer, as `mmctl pretrain` writes one."""
    import torch

    from mmctl import checkpoints
    from mmctl.data.synthetic import arithmetic, stories
    from mmctl.models.transformer import ModelConfig, Transformer
    from mmctl.tokenizer import bpe

    root = tmp_path_factory.mktemp("ckpt")
    bpe.save(bpe.train(list(stories(200, 0)) + list(arithmetic(200, 0)), vocab_size=512), root / "tok", 256)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_position_embeddings=64))
    return checkpoints.save(model, root / "model", bpe.load(root / "tok"))


@pytest.fixture(scope="session")
def chat_checkpoint(checkpoint, tmp_path_factory):
    """The same model saved as a chat model (what `mmctl sft` writes): its replies end at the end-of-turn token."""
    from mmctl import checkpoints

    model, tok = checkpoints.load(checkpoint)
    return checkpoints.save(model, tmp_path_factory.mktemp("chat") / "model", tok, chat=True)


@pytest.fixture(scope="session")
def vlm_dir(checkpoint, tmp_path_factory):
    """An untrained VLM (a 16-px ViT in front of the test LM) saved in Llava's layout."""
    import torch

    from mmctl import checkpoints
    from mmctl.models import vlm
    from mmctl.models.projector import ProjectorConfig
    from mmctl.models.vit import ViTConfig
    from mmctl.tokenizer.bpe import IMAGE

    lm, tok = checkpoints.load(checkpoint)
    torch.manual_seed(0)
    section = vlm.VisionSection(encoder=ViTConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                                                  num_layers=2, num_heads=2), projector=ProjectorConfig("mlp"))
    return checkpoints.save_vlm(vlm.VLM(section, lm, tok.token_id(IMAGE)), tmp_path_factory.mktemp("vlm") / "model",
                                tok)
