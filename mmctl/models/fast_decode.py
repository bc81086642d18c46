"""The one-token decode step, written for speed: gpt-fast's recipe on mmctl's model.

Decoding a token reads every weight once and does little arithmetic with it, so its cost is memory traffic and
per-call overhead, not FLOPs. `Transformer.forward` decodes correctly but pays for its generality; this step, used
by `mmctl.generate` once `fuse` has prepared a model, does three things differently:

1. Fused weights. q, k and v become one matrix and gate and up another, so a layer makes 4 matrix products
   instead of 7. The fused matrices are the storage of the original layers' weights, which become views into them:
   the checkpoint's names and `Transformer.forward` are unchanged, and no weight is held twice.
2. Weights stored input-major: a (out, in) weight lives in memory as its (in, out) transpose. Measured here, CPU
   BLAS multiplies one row by that layout about 2× faster than by the usual one (benchmarks/generate.md).
3. Static shapes. The new key is written at a slot passed as a tensor and attention reads the cache under a
   mask; compiled, it reads the whole preallocated cache, so every step has the same shapes and `torch.compile`
   (`compiled`) builds it once per batch size and cache length, then replays it (eager, it reads only the
   filled part).

Leaves out: quantized and LoRA layers and VLMs (their text decoding takes the general path); a GPU's CUDA graphs
(`mode="reduce-overhead"`) are not used — nothing here was measured on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmctl.models.transformer import KVCache, Transformer, apply_rotary, attend


def _input_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) values, stored as their (in, out) transpose."""
    return weight.t().contiguous().t()


def _fuse(layers: list[nn.Linear], name: str = "weight") -> torch.Tensor:
    """One tensor for the `name` tensors of `layers` (input-major for weights), which keep their own as row blocks
    (views) of it."""
    fused = torch.cat([getattr(layer, name).detach() for layer in layers])
    fused = _input_major(fused) if fused.dim() == 2 else fused
    start = 0
    for layer in layers:
        rows = getattr(layer, name).shape[0]
        getattr(layer, name).data = fused[start:start + rows]
        start += rows
    return fused


def _views_of(fused, layers: list[nn.Linear], name: str = "weight") -> bool:
    return fused is not None and all(getattr(layer, name).untyped_storage().data_ptr()
                                     == fused.untyped_storage().data_ptr() for layer in layers)


def fuse(model) -> bool:
    """Prepare `model` for the fast step, in place and for inference only; False (and nothing changed) where the
    step does not apply. Every plain linear layer's weight moves to input-major storage — also the tied LM head
    and embedding, which is one tensor."""
    if not isinstance(model, Transformer):
        return False
    linears = [model.lm_head] + [layer for block in model.model.layers
                                 for layer in (*block.self_attn.children(), *block.mlp.children())]
    if any(type(layer) is not nn.Linear for layer in linears):  # a quantized or LoRA layer keeps its own path
        return False
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        attn.qkv_weight = _fuse(qkv)
        attn.qkv_bias = _fuse(qkv, "bias") if attn.q_proj.bias is not None else None
        mlp.gate_up_weight = _fuse([mlp.gate_proj, mlp.up_proj])
        for layer in (attn.o_proj, mlp.down_proj):
            layer.weight.data = _input_major(layer.weight.detach())
    model.lm_head.weight.data = _input_major(model.lm_head.weight.detach())  # the embedding too, when tied
    return True


def is_fused(model) -> bool:
    """Whether `fuse` prepared `model` and its layers still hold views of the fused tensors (a later `.to()` or
    `load_state_dict(assign=True)` gives them tensors of their own, which the fused ones would not follow)."""
    if not isinstance(model, Transformer):
        return False
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        if not (_views_of(getattr(attn, "qkv_weight", None), qkv)
                and _views_of(getattr(mlp, "gate_up_weight", None), [mlp.gate_proj, mlp.up_proj])):
            return False
        if attn.q_proj.bias is not None and not _views_of(attn.qkv_bias, qkv, "bias"):
            return False
    return True


def step(model: Transformer, token: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
         keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after one new token per row.

    token, positions: (B,) the new tokens and their positions (rows are left-padded, so positions differ);
    slot: (1,) the cache slot they are written to, the same for every row; keys, values: each layer's cache
    (B, K, S, D); valid: (B, S) which slots hold real tokens. Slots after `slot` are masked, so what a cut-back
    cache (speculative decoding) holds beyond its fill level is never read.
    """
    cfg = model.cfg
    B = token.shape[0]
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    x = model.model.embed_tokens(token)  # (B, C)
    cos, sin = model.model.rotary(positions[:, None], x.dtype)  # (B, 1, D)
    seen = torch.arange(valid.shape[1], device=valid.device) <= slot  # (S,) the new slot and every one before it
    mask = (valid & seen)[:, None, None, :]  # (B, 1, 1, S)
    for i, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        qkv = F.linear(block.input_layernorm(x), attn.qkv_weight, attn.qkv_bias)
        q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
        q, k = apply_rotary(q.view(B, H, 1, D), k.view(B, K, 1, D), cos, sin)
        keys[i].index_copy_(2, slot, k)
        values[i].index_copy_(2, slot, v.view(B, K, 1, D))
        y = attend(q, keys[i], values[i], mask)  # (B, H, 1, D): the model's own attention
        x = x + attn.o_proj(y.reshape(B, H * D))
        gate, up = F.linear(block.post_attention_layernorm(x), mlp.gate_up_weight).chunk(2, dim=-1)
        x = x + mlp.down_proj(F.silu(gate) * up)
    return model.lm_head(model.model.norm(x))


def cache_length(needed: int, context: int) -> int:
    """A compiled step is built per cache length: round up to a power of two (at least 64, at most the context),
    so a run over prompts of many lengths compiles a few times, not once per length."""
    return min(max(64, 1 << (needed - 1).bit_length()), max(context, needed))


_compiled: dict = {}  # device type → compiled `step`


def compiled(device: torch.device):
    """`step` through torch.compile for models on `device` (the first call per shape compiles: 3–12 s measured
    here). On a CPU, inductor's C++ wrapper calls the kernels without a Python frame per kernel, which is what
    pays (measured: 1.4× the eager step; without it, nothing)."""
    if device.type not in _compiled:
        # every model shape, batch size, dtype and cache length is one more compiled version of `step`; past
        # dynamo's limit (8) it would silently run the step uncompiled, as a run over many checkpoints would find
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
        setattr(config, name, max(getattr(config, name), 64))
        options = {"cpp_wrapper": True} if device.type == "cpu" else None
        _compiled[device.type] = torch.compile(step, dynamic=False, options=options)
    return _compiled[device.type]


def decode(model: Transformer, token: torch.Tensor, positions: torch.Tensor, cache: KVCache,
           compile: bool = False) -> torch.Tensor:
    """One step of `step` (compiled or not) against `cache`, whose fill level it advances. Logits (B, V).
    Compiled, the step reads the whole cache (one shape for every step); eager, only its filled part."""
    if cache.length >= cache.max_len:
        raise ValueError(f"KV cache holds {cache.max_len} tokens, {cache.length + 1} needed")
    slot = torch.tensor([cache.length], device=token.device)
    if compile:
        logits = compiled(token.device)(model, token, positions, slot, cache.k, cache.v, cache.valid)
    else:
        n = cache.length + 1
        logits = step(model, token, positions, slot, [k[:, :, :n] for k in cache.k], [v[:, :, :n] for v in cache.v],
                      cache.valid[:, :n])
    cache.length += 1
    return logits
