"""Fully sharded data parallel training (FSDP2, `torch.distributed.fsdp.fully_shard`) under `accelerate launch
--use_fsdp`: each of N processes keeps 1/N of every weight, gradient and AdamW moment (ZeRO-3; SHARD_GRAD_OP
keeps the weights whole between forward and backward, ZeRO-2), and gathers a block's weights just before using them.

The loop (mmctl/train/loop.py) shards the model before the optimizer is made, so AdamW's moments are sharded too;
checkpoints gather every tensor to full size (a collective: every process takes part) and rank 0 writes
them exactly as a single process would, so a checkpoint or model dir does not depend on how it was trained, and
a resume shards the full tensors again (`like`). Works on CPU (gloo) and GPU (nccl); a stage opts in (pretrain,
full sft) because its evaluation and batches must run the same forward passes on every process.
"""

from __future__ import annotations

import torch
from torch import nn


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch ≥ 2.6
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def shard(model: nn.Module, strategy: str) -> None:
    """Shard `model` in place: each transformer block is one unit (gathered, used, freed in turn), the embedding,
    final norm and head the root unit."""
    fully_shard = _fully_shard()
    keep = strategy == "SHARD_GRAD_OP"  # keep the gathered weights from forward to backward
    for block in model.model.layers:
        fully_shard(block, reshard_after_forward=not keep)
    fully_shard(model, reshard_after_forward=not keep)


def is_sharded(t) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")  # a DTensor


def full(t):
    """A sharded tensor gathered to its full size (a collective), anything else as it is."""
    return t.full_tensor() if is_sharded(t) else t


def like(t: torch.Tensor, p) -> torch.Tensor:
    """Full tensor `t` sharded as parameter `p` is (when `p` is sharded and `t` has its shape)."""
    if not is_sharded(p) or tuple(t.shape) != tuple(p.shape):
        return t
    try:
        from torch.distributed.tensor import distribute_tensor  # torch ≥ 2.5
    except ImportError:
        from torch.distributed._tensor import distribute_tensor

    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements)


def gather(model: nn.Module, keep: bool = True) -> None:
    """Make every parameter of a trained, sharded `model` a full tensor again where `keep` (the process that saves
    it), so the stage saves it as it would alone; every process takes part (a collective), one tensor at a time.
    The model's forward is still FSDP's, a collective: the model is for saving after this, not for training or
    running on one process."""
    done: dict[int, nn.Parameter] = {}  # a tied matrix is one parameter in two modules
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and is_sharded(p):
                if id(p) not in done:
                    whole = p.detach().full_tensor()
                    done[id(p)] = nn.Parameter(whole, requires_grad=p.requires_grad) if keep else None
                if keep:
                    module._parameters[name] = done[id(p)]
