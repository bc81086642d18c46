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
