"""Resource accounting as pure arithmetic: parameters, FLOPs, time and scaling for an `Arch`.

Each function returns `Line`s: a value, its unit, the formula that produced it (with the numbers put in) and
the source of the convention, so `mmctl account --explain` can show its work. No torch needed.

Conventions (stated once, used everywhere):
- FLOPs count multiply-adds as 2 (a matmul of m×k by k×n is 2·m·n·k), only in matmuls: embedding lookups,
  norms, biases, softmax and activations are left out (they are <1% at these sizes and no accelerator's peak
  counts them). Forward FLOPs per token = 2·N_matmul + 2·H·T·(Dqk + Dv) per layer (PaLM appendix B; Dqk = Dv
  = Dh gives the familiar 4·L·T·H·Dh). The attention term counts all T keys (what a dense kernel and torch's
  FlopCounterMode compute); the causal average, (T+1)/2 keys, is shown beside it. Training = 3 × forward
  (backward = 2 × forward); activation recomputation adds the recomputed forward on top.
- Memory (inference and training) is in `memory.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmctl.accounting.arch import Arch

KORTHIKANTI = "Korthikanti et al. 2022, §4 (generalised; see mmctl/accounting/memory.py)"
PALM = "PaLM (Chowdhery et al. 2022), appendix B"
CHINCHILLA = "Hoffmann et al. 2022 (Chinchilla), approach 3 fit, eq. 10"


@dataclass(frozen=True)
class Line:
    """One number of the report. `key` is its place in the JSON output (`params.total`)."""

    key: str
    label: str
    value: float
    unit: str  # params | FLOP | bytes | s | hours | tokens | nats | ratio
    formula: str = ""
    source: str = ""


@dataclass(frozen=True)
class Workload:
    """What is run: context T, micro-batch B per GPU, training tokens D, and how training is set up."""

    seq_len: int = 2048
    batch_size: int = 1
    tokens: float | None = None
    precision: str = "bf16-mixed"  # fp32 | bf16-mixed | fp16-mixed | bf16-true
    zero: int = 0
    num_gpus: int = 1
    activation_checkpointing: str = "none"  # none | selective | full
    attention: str = "flash"  # flash | eager


@dataclass(frozen=True)
class Linear:
    """A weight matrix of the blocks: out×in, present `copies` times, `active` of them used per token."""

    name: str
    out_features: int
    in_features: int
    copies: int
    active: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features * self.copies


def linears(a: Arch) -> list[Linear]:
    """Every matmul weight inside the blocks (the LM head is counted separately)."""
    L, d, H, K = a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads
    out: list[Linear] = []
    if a.mla:
        dqk, dv, r_kv = a.qk_head_dim, a.value_head_dim, a.kv_lora_rank
        if a.q_lora_rank:
            out += [Linear("attn.q_a_proj", a.q_lora_rank, d, L, L),
                    Linear("attn.q_b_proj", H * dqk, a.q_lora_rank, L, L)]
        else:
            out.append(Linear("attn.q_proj", H * dqk, d, L, L))
        out += [Linear("attn.kv_a_proj_with_mqa", r_kv + a.qk_rope_head_dim, d, L, L),
                Linear("attn.kv_b_proj", H * (a.head_dim + dv), r_kv, L, L),
                Linear("attn.o_proj", d, H * dv, L, L)]
    else:
        dh = a.head_dim
        out += [Linear("attn.q_proj", H * dh, d, L, L), Linear("attn.k_proj", K * dh, d, L, L),
                Linear("attn.v_proj", K * dh, d, L, L), Linear("attn.o_proj", d, H * dh, L, L)]
    dense = L - a.moe_layers
    F = a.intermediate_size
    if dense:
        if a.gated_mlp:
            out += [Linear("mlp.gate_proj", F, d, dense, dense), Linear("mlp.up_proj", F, d, dense, dense),
                    Linear("mlp.down_proj", d, F, dense, dense)]
        else:
            out += [Linear("mlp.fc", F, d, dense, dense), Linear("mlp.proj", d, F, dense, dense)]
    if a.moe_layers:
        n, E, k, Fe = a.moe_layers, a.num_experts, a.experts_per_token, a.expert_size
        out += [Linear("moe.router", E, d, n, n),
                Linear("moe.experts.gate_proj", Fe, d, n * E, n * k),
                Linear("moe.experts.up_proj", Fe, d, n * E, n * k),
                Linear("moe.experts.down_proj", d, Fe, n * E, n * k)]
        if a.shared_expert_size:
            Fs = a.shared_expert_size
            out += [Linear("moe.shared.gate_proj", Fs, d, n, n), Linear("moe.shared.up_proj", Fs, d, n, n),
                    Linear("moe.shared.down_proj", d, Fs, n, n)]
    return out


def _attention_extras(a: Arch) -> int:
    """Biases and norms inside the attention block (not matmul weights)."""
    L, d, H, K = a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads
    per_layer = 0
    if a.mla:
        per_layer += a.q_lora_rank + a.kv_lora_rank  # q_a_layernorm, kv_a_layernorm
        if a.qkv_bias:
            per_layer += a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim
    else:
        if a.qkv_bias:
            per_layer += (H + 2 * K) * a.head_dim
        if a.qk_norm:
            per_layer += (H + K) * a.head_dim
    if a.o_bias:
        per_layer += d
    return L * per_layer


def _mlp_biases(a: Arch) -> int:
    if not a.mlp_bias:
        return 0
    dense = a.num_layers - a.moe_layers
    F, d = a.intermediate_size, a.hidden_size
    return dense * ((2 * F + d) if a.gated_mlp else (F + d))


def params(a: Arch) -> list[Line]:
    V, d, L = a.vocab_size, a.hidden_size, a.num_layers
    lin = linears(a)
    attn = sum(x.numel for x in lin if x.name.startswith("attn.")) + _attention_extras(a)
    mlp_w = sum(x.numel for x in lin if not x.name.startswith("attn."))
    mlp = mlp_w + _mlp_biases(a)
    token_emb, pos_emb = V * d, a.learned_positions * d
    norm_w = 2 if a.layer_norm else 1
    norms = (L * a.norms_per_layer + 1) * d * norm_w
    head = 0 if a.tie_embeddings else V * d
    total = token_emb + pos_emb + attn + mlp + norms + head
    inactive = sum((x.copies - x.active) * x.out_features * x.in_features for x in lin)
    emb_formula = "V·d" + (" + T_max·d (learned positions)" if pos_emb else "")
    mlp_formula = ("L·(3·d·F)" if a.gated_mlp else "L·(2·d·F + F + d)") if not a.num_experts else (
        "dense layers·3·d·F + MoE layers·(E·d router + E·3·d·Fe" + (" + 3·d·Fs shared" if a.shared_expert_size else "")
        + ")")
    attn_formula = ("L·(d·r_q + r_q·H·Dqk + d·(r_kv + Dr) + r_kv·H·(Dh + Dv) + H·Dv·d + norms)" if a.mla
                    else "L·(d·H·Dh + 2·d·K·Dh + H·Dh·d" + (" + biases" if a.qkv_bias or a.o_bias else "")
                    + (" + q/k norms" if a.qk_norm else "") + ")")
    lines = [
        Line("params.embeddings", "embeddings", token_emb + pos_emb, "params",
             f"{emb_formula} = {V}·{d}" + (f" + {a.learned_positions}·{d}" if pos_emb else "")),
        Line("params.attention", "attention", attn, "params", attn_formula),
        Line("params.mlp", "MLP / experts" if a.num_experts else "MLP", mlp, "params", mlp_formula),
        Line("params.norms", "norms", norms, "params",
             f"(L·{a.norms_per_layer} + 1)·d" + ("·2 (weight and bias)" if a.layer_norm else "")),
        Line("params.head", "LM head" + (" (tied to embeddings)" if a.tie_embeddings else ""), head, "params",
             "0: shares the embedding matrix" if a.tie_embeddings else f"V·d = {V}·{d}"),
        Line("params.total", "total", total, "params", "sum of the above (a tied matrix counted once)"),
        Line("params.non_embedding", "non-embedding", total - token_emb - pos_emb - head, "params",
             "total − embeddings − untied head", "Kaplan et al. 2020"),
    ]
    if a.num_experts:
        lines.append(Line("params.active", "active per token", total - inactive, "params",
                          f"total − (E − k)·3·d·Fe per MoE layer = total − ({a.num_experts} − "
                          f"{a.experts_per_token})·3·{d}·{a.expert_size}·{a.moe_layers}"))
    else:
        lines.append(Line("params.active", "active per token", total, "params", "dense: every parameter"))
    return lines


def matmul_params(a: Arch) -> int:
    """N_matmul: weights multiplied per token — block linears actually used, plus the LM head."""
    return sum(x.active * x.out_features * x.in_features for x in linears(a)) + a.vocab_size * a.hidden_size


def attention_flops_per_token(a: Arch, seq_len: int, causal: bool = False) -> float:
    """Σ_layers 2·H·keys·(Dqk + Dv): scores QKᵀ and the weighted sum with V, for one query token."""
    total = 0.0
    for window in a.layer_windows(seq_len):
        if causal:  # average keys over positions 1..T, each sees min(position, window)
            keys = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
        else:
            keys = window
        total += 2 * a.num_heads * keys * (a.qk_head_dim + a.value_head_dim)
    return total


def forward_flops_per_token(a: Arch, seq_len: int) -> float:
    """2·N_matmul + the attention term: the forward pass's FLOPs for one token at context `seq_len`."""
    return 2 * matmul_params(a) + attention_flops_per_token(a, seq_len)


def train_flops_per_token(a: Arch, seq_len: int) -> float:
    """Training FLOPs per token: forward + backward, the backward pass costing twice the forward (PaLM's)."""
    return 3 * forward_flops_per_token(a, seq_len)


def flops(a: Arch, w: Workload, tokens: float) -> list[Line]:
    T = w.seq_len
    n = matmul_params(a)
    attn = attention_flops_per_token(a, T)
    attn_causal = attention_flops_per_token(a, T, causal=True)
    fwd = forward_flops_per_token(a, T)
    recompute = {"none": 0.0, "selective": attn, "full": fwd}[w.activation_checkpointing]
    train = train_flops_per_token(a, T)
    window = f", windows {a.sliding_window} on {a.sliding_layers} layers" if a.sliding_layers else ""
    return [
        Line("flops.tokens", "training tokens D", tokens, "tokens", "train.tokens, or Chinchilla's 20·N if unset"),
        Line("flops.matmul_params", "N_matmul (weights used per token)", n, "params",
             "block linears used per token + LM head V·d (embedding lookups excluded)"),
        Line("flops.forward_per_token", f"forward / token at T={T}", fwd, "FLOP",
             f"2·N_matmul + Σ_L 2·H·T·(Dqk + Dv) = 2·{n} + {attn:.4g}{window}", PALM),
        Line("flops.forward_per_token_causal", "  with causal attention (average)", 2 * n + attn_causal, "FLOP",
             "attention term × (T+1)/(2T): query t sees t keys", PALM),
        Line("flops.train_per_token", "training / token", train, "FLOP", "3 × forward (backward = 2 × forward)",
             PALM),
        Line("flops.train_per_token_with_recompute", f"  + recompute ({w.activation_checkpointing})",
             train + recompute, "FLOP",
             {"none": "no recomputation", "selective": "+ the attention-core forward (scores and AV)",
              "full": "+ one more forward"}[w.activation_checkpointing], KORTHIKANTI),
        Line("flops.train_total", f"training total for D={tokens:.4g} tokens", train * tokens, "FLOP",
             "training / token × D"),
        Line("flops.six_nd", "  6·N·D rule of thumb", 6 * n * tokens, "FLOP", "6·N_matmul·D (no attention term)",
             "Kaplan et al. 2020"),
    ]


def timing(train_total: float, peak: float, num_gpus: int, mfu: float, gpu: str, dtype: str) -> list[Line]:
    seconds = train_total / (num_gpus * peak * mfu)
    return [
        Line("time.peak_flops_per_gpu", f"peak {dtype} FLOP/s per GPU ({gpu}, dense)", peak, "FLOP/s",
             "datasheet dense peak (never the 2:4-sparse headline)"),
        Line("time.seconds", f"wall clock on {num_gpus} × {gpu} at MFU {mfu:g}", seconds, "s",
             "training FLOPs / (GPUs · peak · MFU); MFU counts model FLOPs, so recomputation lowers the MFU "
             "you reach rather than adding FLOPs here"),
        Line("time.gpu_hours", "GPU-hours", seconds * num_gpus / 3600, "hours", "seconds · GPUs / 3600"),
    ]


CHINCHILLA_FIT = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def scaling(total_params: int, tokens: float) -> list[Line]:
    f = CHINCHILLA_FIT
    loss = f["E"] + f["A"] / total_params ** f["alpha"] + f["B"] / tokens ** f["beta"]
    # The fit saw models of 70M-16B parameters trained on 5B-500B tokens; outside that it extrapolates.
    inside = 70e6 <= total_params <= 16e9 and 5e9 <= tokens <= 500e9
    return [
        Line("scaling.chinchilla_tokens", "Chinchilla-optimal tokens", 20 * total_params, "tokens",
             "20·N", "Hoffmann et al. 2022"),
        Line("scaling.tokens_per_param", "tokens per parameter (this run)", tokens / total_params, "ratio", "D / N"),
        Line("scaling.predicted_loss", f"predicted loss L(N, D={tokens:.3g})"
             + ("" if inside else " (extrapolated: outside the fit's N, D)"), loss, "nats",
             f"E + A/N^α + B/D^β with E={f['E']}, A={f['A']}, B={f['B']}, α={f['alpha']}, β={f['beta']} "
             "(fit to Chinchilla's data and tokenizer; other data shifts it)", CHINCHILLA),
    ]
