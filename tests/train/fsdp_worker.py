"""One rank of tests/train/test_fsdp.py (run under `accelerate launch --use_fsdp`): shard a model built from
config.json in argv[1] as the training loop does, take one optimizer step, and write the bytes this rank holds
of the parameters, gradients and AdamW moments to argv[1]/rank-R.json."""

import json
import sys
from pathlib import Path

import torch

from mmctl.models.config import ModelConfig
from mmctl.models.transformer import Transformer
from mmctl.runtime import setup_distributed
from mmctl.train import fsdp
from mmctl.train.loss import token_loss
from mmctl.train.optim import OptimConfig, make_optimizer

torch.set_num_threads(1)
dist = setup_distributed("cpu", shardable=True)
directory = Path(sys.argv[1])
cfg = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()), "config.json")
model = Transformer(cfg)
fsdp.shard(model, dist.fsdp)
optimizer = make_optimizer(model, OptimConfig())
ids = torch.randint(cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(dist.rank))
token_loss(model, ids[:, :-1], ids[:, 1:]).backward()
optimizer.step()


def held(tensors) -> int:
    return sum(t.to_local().numel() * t.element_size() for t in tensors)


moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
(directory / f"rank-{dist.rank}.json").write_text(json.dumps({
    "strategy": dist.fsdp, "parameter_bytes": held(model.parameters()),
    "gradient_bytes": held(p.grad for p in model.parameters()), "optimizer_bytes": held(moments)}))
