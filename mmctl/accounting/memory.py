"""Memory as pure arithmetic: weights in each format, the KV cache, and training memory per GPU.

Conventions:
- Bytes; GB = 1e9 bytes. The training peak is at the start of the backward pass or at the optimizer step,
  whichever is higher (activations and gradients are never all alive at once); the sum of all parts is shown
  beside it as an upper bound.
- Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", §4), generalised from GPT-3's block (LayerNorm, MHA, 4d GeLU MLP, dropout) to GQA, SwiGLU, RMSNorm,
  MoE and MLA by the same rule: count every tensor autograd keeps for the backward pass. For GPT-3's block it
  reduces to the paper's s·b·h·(34 + 5·a·s/h) per layer (tests pin this); against a measured CPU training step
  of SmolLM2-135M it is within 0.2% (benchmarks/account.md).
- Model states follow ZeRO's mixed-precision accounting (2 + 2 + 12 bytes per parameter).
"""

from __future__ import annotations

import math

from mmctl.accounting.arch import Arch
from mmctl.accounting.formulas import KORTHIKANTI, Line, Workload, linears

ZERO = "ZeRO (Rajbhandari et al. 2020), §3 and §5"


# Weight-only quantization layouts (bits per weight include their scales):
#   int8: per output row, 8-bit weights + one fp32 scale (LLM.int8's row-wise layout).
#   int4: groups of 128 along the input dim, 4-bit weights + fp16 scale + fp16 zero point (GPTQ/AWQ layout).
#   nf4:  blocks of 64, 4-bit NormalFloat + one fp32 absmax (bitsandbytes, QLoRA without double quantization).
# Only block linears are quantized; embeddings, LM head, norms and biases stay in bf16 (as bitsandbytes and
# GPTQ tooling do by default).
def _weight_bytes(a: Arch, total_params: int, fmt: str) -> float:
    if fmt in ("fp32", "bf16"):
        return total_params * (4 if fmt == "fp32" else 2)
    lin = linears(a)
    quantized = sum(x.numel for x in lin)
    rest = (total_params - quantized) * 2
    if fmt == "int8":
        return rest + quantized + sum(x.out_features * x.copies * 4 for x in lin)
    if fmt == "int4":
        return rest + quantized / 2 + sum(x.out_features * math.ceil(x.in_features / 128) * x.copies * 4 for x in lin)
    if fmt == "nf4":
        return rest + quantized / 2 + sum(math.ceil(x.numel / 64) * 4 for x in lin)
    raise ValueError(fmt)


WEIGHT_FORMATS = {
    "fp32": "4 bytes / param", "bf16": "2 bytes / param",
    "int8": "block linears 1 byte + fp32 scale per output row; the rest bf16",
    "int4": "block linears 4 bits + fp16 scale and zero per 128 inputs (4.25 bits); the rest bf16",
    "nf4": "block linears 4 bits + fp32 absmax per 64 (4.5 bits); the rest bf16",
}


def kv_cache_bytes(a: Arch, seq_len: int, batch: int, bytes_per: int) -> float:
    """Keys and values of every layer for B sequences of T tokens; MLA caches its latent instead."""
    per_token = (a.kv_lora_rank + a.qk_rope_head_dim) if a.mla else 2 * a.num_kv_heads * a.head_dim
    return batch * sum(a.layer_windows(seq_len)) * per_token * bytes_per


def inference_memory(a: Arch, w: Workload, total_params: int) -> list[Line]:
    T, B = w.seq_len, w.batch_size
    act = 4 if w.precision == "fp32" else 2
    dtype = "fp32" if act == 4 else "bf16"
    lines = [Line(f"memory.inference.weights.{fmt}", f"weights {fmt}", _weight_bytes(a, total_params, fmt), "bytes",
                  how) for fmt, how in WEIGHT_FORMATS.items()]
    kv = kv_cache_bytes(a, T, B, act)
    kv_formula = (f"B·Σ_L keys·(r_kv + Dr)·{act} bytes (MLA latent cache)" if a.mla
                  else f"B·Σ_L keys·2·K·Dh·{act} bytes = {B}·Σ keys·2·{a.num_kv_heads}·{a.head_dim}·{act}")
    if a.sliding_layers:
        kv_formula += f"; keys = min(T, {a.sliding_window}) on {a.sliding_layers} sliding-window layers"
    lines.append(Line("memory.inference.kv_cache", f"KV cache {dtype}, B={B}, T={T}", kv, "bytes", kv_formula))
    lines.append(Line("memory.inference.peak", f"peak ({dtype} weights + KV cache)",
                      _weight_bytes(a, total_params, dtype) + kv, "bytes", "weights + KV cache"))
    return lines


def activation_bytes_per_layer(a: Arch, w: Workload, moe: bool) -> tuple[float, float]:
    """(bytes kept per layer for backward, of which T²-sized attention-score bytes), no recomputation."""
    s, b, d = w.seq_len, w.batch_size, a.hidden_size
    act = 4 if w.precision == "fp32" else 2  # activations follow the compute dtype
    mask = 1 if a.dropout else 0  # dropout masks are 1 byte per element
    H, K = a.num_heads, a.num_kv_heads
    sb = s * b
    # LayerNorm's kernel keeps its input (and per-row statistics), as the paper counts; an RMSNorm written in
    # PyTorch ops (transformers', mmctl's) also keeps its normalized output for the gain's gradient.
    norms = a.norms_per_layer * act * sb * d * (1 if a.layer_norm else 2)
    attn = act * sb * d  # the normed input shared by the q/k/v projections
    if a.mla:
        K = H  # the latent is expanded to full heads before attention
        attn += act * sb * (a.q_lora_rank * 2 + (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank)
    if w.attention == "eager":
        K = H  # eager attention repeats K and V to every query head before the matmuls, and keeps the copies
    attn += act * sb * (H + K) * a.qk_head_dim  # Q and K (after RoPE) for QKᵀ
    attn += act * sb * K * a.value_head_dim  # V for the weighted sum
    if a.qk_norm:
        attn += act * sb * (H + K) * a.head_dim  # q_norm / k_norm inputs
    attn += act * sb * H * a.value_head_dim  # o_proj input
    attn += mask * sb * d  # residual dropout mask
    scores = 0.0
    if w.attention == "eager":  # softmax output, dropout mask and dropout output: (2 + 1 + 2)·a·s²·b for bf16
        scores = (act + mask + (act if a.dropout else 0)) * H * s * s * b
    else:  # fused kernels keep only the fp32 log-sum-exp per query and head
        attn += 4 * H * sb
    if moe:
        k, Fe, E = a.experts_per_token, a.expert_size, a.num_experts
        mlp = act * sb * (d + E) + k * act * sb * (d + 4 * Fe)  # router input and logits; each chosen expert
        if a.shared_expert_size:
            mlp += 4 * act * sb * a.shared_expert_size
    elif a.gated_mlp:  # input; gate out, up out, act(gate) out, product (down_proj input)
        mlp = act * sb * d + 4 * act * sb * a.intermediate_size
    else:  # input; fc out (GeLU input), GeLU out (proj input); dropout mask
        mlp = act * sb * d + 2 * act * sb * a.intermediate_size + mask * sb * d
    return norms + attn + mlp + scores, scores


def activation_memory(a: Arch, w: Workload) -> tuple[float, str]:
    """Bytes of activations kept for the backward pass over all layers, and the formula used."""
    s, b, d = w.seq_len, w.batch_size, a.hidden_size
    act = 4 if w.precision == "fp32" else 2
    dense = a.num_layers - a.moe_layers
    per_dense, scores_dense = activation_bytes_per_layer(a, w, moe=False)
    per_moe, scores_moe = activation_bytes_per_layer(a, w, moe=True) if a.moe_layers else (0.0, 0.0)
    if w.activation_checkpointing == "full":  # layer inputs, plus one layer rematerialised during its backward
        total = act * s * b * d * a.num_layers + max(per_dense if dense else 0, per_moe)
        return total, f"L·{act}·s·b·d (layer inputs) + one layer recomputed at a time"
    if w.activation_checkpointing == "selective":  # recompute the attention core: its s² tensors are not kept
        total = dense * (per_dense - scores_dense) + a.moe_layers * (per_moe - scores_moe)
        return total, "per layer: every tensor kept for backward except the s² attention scores"
    total = dense * per_dense + a.moe_layers * per_moe
    return total, ("per layer: every tensor kept for backward" +
                   ("; includes the s² attention scores (eager)" if w.attention == "eager" else
                    "; fused attention keeps no s² scores"))


PRECISION_BYTES = {  # bytes per parameter: (weights, gradients, fp32 master copy, optimizer states)
    "fp32": (4, 4, 0, 8),
    "bf16-mixed": (2, 2, 4, 8),
    "fp16-mixed": (2, 2, 4, 8),
    "bf16-true": (2, 2, 0, 4),
}


def model_state_bytes(total_params: int, precision: str, zero: int, num_gpus: int) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, fp32 master weights and AdamW states, ZeRO-sharded over the GPUs.

    ZeRO's mixed-precision accounting: 2 + 2 + 12 bytes per parameter; stage 1 shards the 12 (master copy and
    moments), stage 2 also the gradients, stage 3 also the weights.
    """
    wb, gb, mb, ob = PRECISION_BYTES[precision]
    N, G = total_params, num_gpus
    return {"weights": N * wb / (G if zero >= 3 else 1), "gradients": N * gb / (G if zero >= 2 else 1),
            "master_weights": N * mb / (G if zero >= 1 else 1), "optimizer": N * ob / (G if zero >= 1 else 1)}


def training_memory(a: Arch, w: Workload, total_params: int) -> list[Line]:
    G, z = w.num_gpus, w.zero
    wb, gb, mb, ob = PRECISION_BYTES[w.precision]
    state = model_state_bytes(total_params, w.precision, z, G)
    s, b, d, V = w.seq_len, w.batch_size, a.hidden_size, a.vocab_size
    act = 4 if w.precision == "fp32" else 2
    acts, act_formula = activation_memory(a, w)
    acts += 2 * act * s * b * d  # final norm input and LM head input
    logits = 4 * s * b * V  # fp32 log-softmax kept for the cross-entropy backward (Korthikanti's 4·s·b·v)

    def sharded(stage: int) -> str:
        return f" / {G} GPUs (ZeRO-{stage})" if z >= stage and G > 1 else ""

    parts = [
        Line("memory.training.weights", f"weights ({wb} B/param)", state["weights"], "bytes", f"N·{wb}" + sharded(3),
             ZERO),
        Line("memory.training.gradients", f"gradients ({gb} B/param)", state["gradients"], "bytes",
             f"N·{gb}" + sharded(2), ZERO),
        Line("memory.training.master_weights", "fp32 master weights", state["master_weights"], "bytes",
             f"N·4{sharded(1)}" if mb else f"none under {w.precision}", ZERO),
        Line("memory.training.optimizer", f"AdamW states ({ob} B/param)", state["optimizer"], "bytes",
             f"N·{ob} (first and second moments){sharded(1)}", ZERO),
        Line("memory.training.activations", f"activations (B={b}, T={s}, {w.activation_checkpointing} recompute)",
             acts, "bytes", act_formula + f"; + final norm and head inputs; {act}-byte activations", KORTHIKANTI),
        Line("memory.training.logits", "logits for the loss", logits, "bytes", f"4·s·b·V = 4·{s}·{b}·{V} (fp32)",
             KORTHIKANTI),
    ]
    # Autograd frees activations as the backward pass produces gradients, and zero_grad(set_to_none) frees the
    # gradients before the next forward, so the two never peak together: the high-water mark is at the start of
    # the backward (all activations, the kept log-softmax and its gradient) or at the optimizer step (all
    # gradients). The sum of every part is the bound tools that add everything report.
    states = state["weights"] + state["master_weights"] + state["optimizer"]
    peak = states + max(acts + 2 * logits, state["gradients"])
    everything = sum(p.value for p in parts) + logits  # + the logits' gradient, which the peak counts too
    parts.append(Line("memory.training.peak", "peak per GPU", peak, "bytes",
                      "weights + master + AdamW + max(activations + 2·logits at the start of the backward, gradients "
                      "at the optimizer step)"))
    parts.append(Line("memory.training.sum_of_parts", "  sum of all parts (upper bound)", everything, "bytes",
                      "every part resident at once, with the logits' gradient"))
    return parts
