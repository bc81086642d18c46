"""A Llama-style decoder-only transformer, written to be read ("Llama from scratch").

Follows Meta's Llama 2/3 reference model and Hugging Face's `LlamaForCausalLM`, whose parameter names it keeps
exactly (`model.layers.0.self_attn.q_proj.weight` …) so a checkpoint is saved and loaded with no renaming step:
RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021) in HF's rotate-half layout with
Llama 3.1's frequency scaling, grouped-query attention (Ainslie et al. 2023) through
`F.scaled_dot_product_attention`, a SwiGLU MLP (Shazeer 2020), optional q/k/v biases (Qwen2), tied or untied
embeddings, and a preallocated KV cache with separate prefill and decode paths.

Shapes: B batch, T new tokens, S cached + new tokens, C hidden size, H query heads, K key/value heads,
G = H // K query heads per key/value head, D head dim, F MLP size, V vocab, L layers.

Leaves out: dropout, sliding-window attention, other RoPE scalings (linear, dynamic NTK, YaRN), MoE, and biases on
o_proj or the MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mmctl.errors import UsageError
from mmctl.models.config import ModelConfig

# --- helpers -------------------------------------------------------------------------------------------------

def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """The D/2 rotation frequencies θ^(-2i/D), with Llama 3.1's scaling when configured. (D/2,) float32."""
    D = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    if cfg.rope_scaling is None:
        return inv_freq
    # Llama 3.1: keep short wavelengths, stretch long ones by `factor`, blend smoothly in between
    # (same arithmetic as transformers' _compute_llama3_parameters, so logits match to the last bit).
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's layout pairs dimension i with i + D/2 (not 2i with 2i+1 as in Meta's complex-number code)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k (B, heads, T, D) by their positions; cos/sin are (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): the same rotation for every head
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def build_mask(valid: torch.Tensor | None, document_ids: torch.Tensor | None, start: int, end: int,
                   decode: bool, device=None) -> torch.Tensor | None:
    """The one mask builder: the boolean mask SDPA takes (True = may attend) for queries at slots [start, end)
    over keys [0, end), or None for plain causal attention.

    valid: (B, S) which key slots hold real tokens (None: all do) — left padding, in a batch or a KV cache.
    document_ids: (B, T) packed rows (no cache): a query sees only earlier tokens of its own document.
    """
    if decode:  # the one new token per row comes after every key: only padding needs masking
        return None if valid is None else valid[:, None, None, :]  # (B, 1, 1, S)
    if valid is None and document_ids is None and start == 0:
        return None
    T = end - start
    slots = torch.arange(end, device=device)
    mask = slots[None, :] <= slots[start:, None]  # (T, S) causal
    if document_ids is not None:
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])  # (B, T, T) block-diagonal causal
    if valid is not None:
        mask = mask & valid[:, None, :]  # (B, T, S)
    # A padding query has no real key before it; letting it see itself avoids an all-masked row, which SDPA turns
    # into NaN. Its output is never used.
    return (mask | (slots[None, :] == slots[start:, None])).view(-1, 1, T, end)  # (B or 1, 1, T, S)


def positions_in_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) each token's index within its document, for rows packed with consecutive documents."""
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]  # where a new document begins
    return index - torch.where(starts, index, 0).cummax(dim=1).values  # (B, T)


class KVCache:
    """Keys and values of every layer, in buffers allocated once at full length (static shapes).

    All rows share one fill level `length`: a batch is left-padded, so row b's real tokens end at the same slot
    as everyone else's, and `valid` (B, S_max) marks which slots hold real tokens. The model appends to it.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, *, dtype=torch.float32, device=None):
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_size)  # (B, K, S_max, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.padded = False  # any invalid slot yet? (without padding the decode path needs no mask at all)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, K, T, D) after the filled slots; return all keys/values so far (B, K, S, D).

        `length` is advanced by the model once every layer has written, so all layers write to the same slots.
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# --- sub-blocks ----------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, computed in float32 as HF does, so bf16 runs stay stable."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """cos and sin of each position's rotation angles, computed once per forward and shared by every layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, D): rotate-half layout repeats the frequencies
        return angles.cos().to(dtype), angles.sin().to(dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention: H query heads share K key/value heads (MHA if K = H, MQA if K = 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.H, self.K, self.D = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.H * self.D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.K * self.D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.K * self.D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.H * self.D, C, bias=False)
        self.record = False  # keep the attention weights of the next full forward in `.weights` (mmctl report)
        self.weights: torch.Tensor | None = None

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.H, self.K, self.D
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D)
        if self.record and not (cache is not None and T == 1):  # the weights written out, to be kept (B, H, T, S)
            self.weights = attention_weights(q, k, mask)
            y = self.weights @ (v.repeat_interleave(H // K, dim=1) if K != H else v)
        else:
            y = attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, H·D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention: queries (B, H, T, D) against keys and values (B, K, S, D), each key/value head
    serving G = H / K consecutive query heads → (B, H, T, D). `mask`: True where a query may attend (broadcast to
    (B, H, T, S)), or None for plain causal attention. The one attention every forward uses — the model's, with a
    cache or without, and the fast decode step's (mmctl/models/fast_decode.py).

    One query per row (decoding against a cache) attends to every cached key, so it needs no causal mask, and its
    G query heads become G "query positions" against their one key/value head: GQA in one SDPA call without
    repeating the keys."""
    B, H, T, D = q.shape
    K = k.shape[1]
    if T == 1:
        y = F.scaled_dot_product_attention(q.view(B, K, H // K, D), k, v, attn_mask=mask)  # (B, K, G, D)
        return y.view(B, H, 1, D)
    if K != H:
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) over the allowed keys, written out (B, H, T, S): what `attend` computes inside SDPA, kept
    for looking at (mmctl report draws it); queries (B, H, T, D), keys (B, K, S, D)."""
    H, K, T, D = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k = k.repeat_interleave(H // K, dim=1) if K != H else k
    allowed = mask if mask is not None else torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril()
    return (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~allowed, float("-inf")).softmax(-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --- block ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# --- model ---------------------------------------------------------------------------------------------------

class Decoder(nn.Module):
    """Embedding, blocks and final norm: the `model.` prefix of HF's parameter names."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.activation_checkpointing = False  # Transformer.gradient_checkpointing_enable() turns it on

    def forward(self, x, position_ids, mask=None, cache=None) -> torch.Tensor:
        """The blocks and the final norm over embeddings x (B, T, C) (the embedding lookup is the caller's, so a
        VLM can write image features into them first)."""
        cos, sin = self.rotary(position_ids, x.dtype)
        for i, block in enumerate(self.layers):
            if self.activation_checkpointing and self.training and cache is None:
                # keep only each block's input; recompute its insides during the backward pass
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        return self.norm(x)


class Transformer(nn.Module):
    """The language model: token ids → next-token logits. `state_dict()` keys are HF Llama's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        problems = cfg.check()
        if problems:
            raise UsageError(*(f"model.{name}: {message}" for name, message in problems))
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights, zero biases, unit norms. GPT-2's scheme scales the two projections that
        write into the residual stream by 1/sqrt(2L), so the stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.model.layers:
            for proj in (block.self_attn.o_proj, block.mlp.down_proj):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.cfg.num_layers))

    @property
    def device(self) -> torch.device:
        """Read from the embeddings: a swapped-in (quantized, LoRA) layer may hold other dtypes or wrappers."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def gradient_checkpointing_enable(self) -> None:
        """Keep only each block's input during training; recompute its insides in the backward pass."""
        self.model.activation_checkpointing = True

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens, in the model's dtype and device."""
        return KVCache(self.cfg, batch_size, max_len, dtype=self.dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, document_ids: torch.Tensor | None = None,
                last_only: bool = False, logits: bool = True) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T), or (B, 1, V) for the last position if `last_only`.

        inputs_embeds: (B, T, C) instead of input_ids — the embeddings with something written into them (a VLM's
            projected image patches at its `<|image|>` slots).
        attention_mask: (B, T) 1 for real tokens, 0 for (left) padding, covering the new tokens only — a cache
            remembers the earlier ones. Padding slots are never attended to.
        position_ids: (B, T); by default each real token's index among the real tokens of its row, so a
            left-padded row gets the same positions as it would alone.
        cache: a `new_cache()`; the new keys/values are appended after what it holds. With a cache, T > 1 is a
            prefill and T == 1 takes the lean decode path.
        document_ids: (B, T) for packed rows (several documents back to back, e.g. SFT packing): a token attends
            only to earlier tokens of its own document, and positions restart at each document, so each document
            computes what it would alone. Training and scoring only (not with a cache).
        logits: False returns the final hidden states (B, T, C) instead, for a loss that applies the head itself
            a chunk at a time (mmctl/train/loss.py).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T = x.shape[:2]
        start = cache.length if cache is not None else 0
        end = start + T
        if end > self.cfg.max_position_embeddings:
            raise UsageError(f"{end} tokens exceed the model's context (max_position_embeddings = "
                             f"{self.cfg.max_position_embeddings})")
        if cache is not None and end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens, {end} needed")
        if document_ids is not None and cache is not None:
            raise UsageError("document_ids (packed documents) cannot be combined with a KV cache")

        if cache is not None and attention_mask is not None:
            cache.valid[:, start:end] = attention_mask.bool()
            cache.padded = cache.padded or not bool(attention_mask.all())
        padded = cache.padded if cache is not None else attention_mask is not None and not bool(attention_mask.all())
        valid = None  # (B, S) which key slots hold real tokens, when some do not
        if padded:
            valid = cache.valid[:, :end] if cache is not None else attention_mask.bool()
        if position_ids is None and document_ids is not None:
            position_ids = positions_in_documents(document_ids)
        elif position_ids is None and valid is not None:
            position_ids = (valid.cumsum(-1)[:, start:] - 1).clamp(min=0)  # (B, T)
        elif position_ids is None:
            position_ids = torch.arange(start, end, device=x.device).expand(B, T)

        decode = cache is not None and T == 1
        mask = build_mask(valid, document_ids, start, end, decode, x.device)
        x = self.model(x, position_ids, mask, cache)
        if cache is not None:
            cache.length = end
        x = x[:, -1:] if last_only else x
        return self.lm_head(x) if logits else x
