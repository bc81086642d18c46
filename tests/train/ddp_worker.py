"""One rank of tests/train/test_loop.py::test_two_processes_equal_one (run under `accelerate launch`): rank r
takes rows 8r..8r+7 of the test's 16 masked rows as two micro-batches, runs one loop step, and rank 0 saves
the gradient."""

import sys
from pathlib import Path

import torch

from mmctl.runtime import setup_distributed
from mmctl.train.loop import train_step
from tests.train.test_loop import Toy, masked_loss, masked_rows

torch.set_num_threads(1)
dist = setup_distributed("cpu")
ids, mask = masked_rows(16, seed=7)
model = Toy()
ddp = torch.nn.parallel.DistributedDataParallel(model)
first = 8 * dist.rank
micro = [(ids[i:i + 4], mask[i:i + 4]) for i in (first, first + 4)]
train_step(ddp, model, torch.optim.SGD(model.parameters(), lr=0.0), micro, masked_loss, 0.0, "fp32", dist, 0)
if dist.main:
    from safetensors.torch import save_file

    save_file({n: p.grad.contiguous() for n, p in model.named_parameters()},
              Path(sys.argv[1]) / "grads-rank0.safetensors")
