"""One normalized description of a decoder-only transformer, read from a Hugging Face `config.json`.

Every family spells its architecture differently (`n_embd` vs `hidden_size`, fused or separate projections,
explicit `head_dim`, MoE and MLA fields); `from_hf_config` turns each into an `Arch` whose fields are all the
accounting formulas need. Missing fields take the defaults of the family's transformers Config class, so a
config.json means here what it means to transformers. Each family's quirks are noted where they are read.

Notation used across `mmctl.accounting`: V vocab, d hidden size, L layers, H query heads, K key/value heads,
Dh head dim, F MLP intermediate size, E experts, k experts per token, T context length, B batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmctl import hf
from mmctl.errors import UsageError

FAMILIES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3", "olmo2", "deepseek_v3")

# Defaults of each family's transformers Config class for the fields that change the arithmetic.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    sliding_window=4096, tie_word_embeddings=False),
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, tie_word_embeddings=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   sliding_window=4096, tie_word_embeddings=True),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096, tie_word_embeddings=False),
    "olmo2": dict(vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False),
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3,
                        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                        qk_nope_head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer, in the notation of the module docstring."""

    name: str
    family: str
    vocab_size: int  # V
    hidden_size: int  # d
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # K
    head_dim: int  # Dh (queries and keys; values too unless MLA sets v_head_dim)
    intermediate_size: int  # F, the dense MLP width
    tie_embeddings: bool
    max_position_embeddings: int
    gated_mlp: bool = True  # SwiGLU/GeGLU (gate, up, down) vs GPT-2's (fc, proj)
    layer_norm: bool = False  # LayerNorm (weight + bias) vs RMSNorm (weight only)
    norms_per_layer: int = 2  # Gemma-2 has four (pre and post, around attention and MLP)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # OLMo-2: RMSNorm over all query / key features (H·Dh and K·Dh)
    learned_positions: int = 0  # GPT-2's position table rows (0 for RoPE)
    dropout: bool = False  # whether dropout masks are stored for the backward pass
    sliding_window: int | None = None
    sliding_layers: int = 0  # how many of the L layers use the window
    # Mixture of experts (E = 0: dense). The first `dense_layers` layers keep a dense MLP of width F.
    num_experts: int = 0  # E routed experts
    experts_per_token: int = 0  # k
    expert_size: int = 0  # Fe, each expert's intermediate size
    shared_expert_size: int = 0  # Fs, total width of the always-on shared experts
    dense_layers: int = 0
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank = 0 means ordinary attention.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    extra: dict = field(default_factory=dict, compare=False)  # the config as read, for reference checks

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.dense_layers if self.num_experts else 0

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        """Per-head width of queries and keys (MLA: the no-RoPE part plus the RoPE part)."""
        return self.head_dim + self.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.mla else self.head_dim

    def layer_windows(self, seq_len: int) -> list[int]:
        """Keys each layer attends to at context T: T, or the window for sliding-window layers."""
        window = min(seq_len, self.sliding_window) if self.sliding_window else seq_len
        return [window] * self.sliding_layers + [seq_len] * (self.num_layers - self.sliding_layers)


def from_hf_config(config: dict[str, Any], name: str = "model", where: str = "config") -> Arch:
    """A Hugging Face config.json (as a dict) → Arch. Errors name the field, e.g. `config.hidden_size`."""
    if not isinstance(config, dict):
        raise UsageError(f"{where}: expected a mapping of config.json fields")
    config = hf.model_config(config)  # (a checkpoint of mmctl's quantized layers: its family's fields)
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UsageError(f"{where}.model_type: {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    c = {**_DEFAULTS[family], **config}  # an explicit null means "none" (no window, no q LoRA), as in transformers
    problems: list[str] = []

    def pos_int(key: str, minimum: int = 1) -> int:
        value = c.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{where}.{key}: expected an integer ≥ {minimum}, got {value!r}")
            return minimum or 1
        return value

    def count(key: str) -> int:
        """An optional count: absent or null means 0."""
        return pos_int(key, 0) if c.get(key) is not None else 0

    def rate(key: str) -> float:
        """A dropout probability: absent or null means 0."""
        value = c.get(key) or 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            problems.append(f"{where}.{key}: expected a probability in [0, 1], got {value!r}")
            return 0.0
        return float(value)

    def window(key: str = "sliding_window") -> int | None:
        return pos_int(key) if c.get(key) else None

    if family == "gpt2":
        d, heads = pos_int("n_embd"), pos_int("n_head")
        inner = c.get("n_inner")
        arch = dict(vocab_size=pos_int("vocab_size"), hidden_size=d, num_layers=pos_int("n_layer"),
                    num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                    intermediate_size=4 * d if inner is None else pos_int("n_inner"),
                    max_position_embeddings=pos_int("n_positions"), learned_positions=pos_int("n_positions"),
                    gated_mlp=False, layer_norm=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                    dropout=any(rate(k) > 0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")))
        if d % heads:
            problems.append(f"{where}.n_embd: {d} is not divisible by n_head ({heads})")
    else:
        d, heads = pos_int("hidden_size"), pos_int("num_attention_heads")
        kv = c.get("num_key_value_heads") or heads
        head_dim = pos_int("head_dim") if c.get("head_dim") else d // heads
        if not c.get("head_dim") and d % heads:
            problems.append(f"{where}.hidden_size: {d} is not divisible by num_attention_heads ({heads}) "
                            "and no head_dim is given")
        if not isinstance(kv, int) or kv < 1 or heads % kv:
            problems.append(f"{where}.num_key_value_heads: {kv!r} must divide num_attention_heads ({heads})")
            kv = heads
        arch = dict(vocab_size=pos_int("vocab_size"), hidden_size=d, num_layers=pos_int("num_hidden_layers"),
                    num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
                    intermediate_size=pos_int("intermediate_size"),
                    max_position_embeddings=pos_int("max_position_embeddings"),
                    qkv_bias=bool(c.get("attention_bias", False)), o_bias=bool(c.get("attention_bias", False)),
                    mlp_bias=bool(c.get("mlp_bias", False)),
                    dropout=rate("attention_dropout") > 0)
        layers = arch["num_layers"]
        if family == "qwen2":  # q/k/v always carry biases, o_proj never; windows only above max_window_layers
            arch.update(qkv_bias=True, o_bias=False)
            if c.get("use_sliding_window") and window():
                arch.update(sliding_window=window(), sliding_layers=max(0, layers - count("max_window_layers")))
        elif family == "gemma2":  # four norms per layer; every other layer (0, 2, …) is sliding-window
            arch.update(norms_per_layer=4)
            if window():
                arch.update(sliding_window=window(), sliding_layers=(layers + 1) // 2)
        elif family in ("mistral", "mixtral", "phi3"):  # windowed everywhere when set
            if window():
                arch.update(sliding_window=window(), sliding_layers=layers)
        elif family == "olmo2":  # post-norms (2 per layer) and RMSNorm over all q and k features
            arch.update(qk_norm=True)
        if family == "phi3":
            arch.update(qkv_bias=False, o_bias=False, mlp_bias=False)
        if family == "mixtral":  # every layer is MoE; intermediate_size is each expert's width
            arch.update(num_experts=pos_int("num_local_experts"), experts_per_token=pos_int("num_experts_per_tok"),
                        expert_size=arch["intermediate_size"])
        if family == "deepseek_v3":
            experts = pos_int("n_routed_experts")
            dense = min(layers, count("first_k_dense_replace"))
            if c.get("moe_layer_freq") not in (None, 1):
                problems.append(f"{where}.moe_layer_freq: only 1 (every layer after the dense ones) is supported")
            q_rank = count("q_lora_rank")
            arch.update(num_experts=experts, experts_per_token=pos_int("num_experts_per_tok"),
                        expert_size=pos_int("moe_intermediate_size"),
                        shared_expert_size=pos_int("moe_intermediate_size") * count("n_shared_experts"),
                        dense_layers=dense, q_lora_rank=q_rank, kv_lora_rank=pos_int("kv_lora_rank"),
                        head_dim=pos_int("qk_nope_head_dim"), qk_rope_head_dim=pos_int("qk_rope_head_dim"),
                        v_head_dim=pos_int("v_head_dim"))
        if arch.get("num_experts") and arch.get("experts_per_token", 0) > arch["num_experts"]:
            problems.append(f"{where}.num_experts_per_tok: {arch['experts_per_token']} exceeds the number of "
                            f"experts ({arch['num_experts']})")
    if problems:
        raise UsageError(*problems)
    return Arch(name=name, family=family, tie_embeddings=bool(c.get("tie_word_embeddings")), extra=dict(config),
                **arch)
