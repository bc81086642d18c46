"""One rank of tests/train/test_fsdp.py (run under `accelerate launch --use_fsdp`): shard a model built from
config.json in argv[1] as the training loop does and write this rank's parameter bytes to argv[1]/rank-R.json."""

import json
import sys
from pathlib import Path

import torch

from mmctl.models.config import ModelConfig
from mmctl.models.transformer import Transformer
from mmctl.runtime import setup_distributed
from mmctl.train import fsdp

torch.set_num_threads(1)
dist = setup_distributed("cpu")
directory = Path(sys.argv[1])
cfg = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()), "config.json")
model = Transformer(cfg)
fsdp.shard(model, dist.fsdp)
held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
(directory / f"rank-{dist.rank}.json").write_text(json.dumps({"strategy": dist.fsdp, "parameter_bytes": held}))
