"""The decoder's architecture: `ModelConfig`, usable directly as a recipe's `model:` section, and its mapping to
and from a Hugging Face `config.json` (transformers' LlamaConfig and Qwen2Config field names; Mistral's are read).

Each model owns its config mapping (DESIGN §10): this one is the Llama family's; a VLM maps its own Llava config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmctl.errors import DataError, UsageError
from mmctl.recipe import option

SUPPORTED = ("llama", "mistral", "qwen2")
# transformers' defaults for fields a config.json may leave out (LlamaConfig / MistralConfig / Qwen2Config).
DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0),
    "mistral": dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0),
    "qwen2": dict(max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    """The architecture; usable directly as a recipe's `model:` section. Defaults make a tiny model."""

    vocab_size: int = option(512, "vocabulary size (tokens)", ge=1)
    hidden_size: int = option(128, "width of the residual stream (C)", ge=1)
    intermediate_size: int = option(384, "width of the SwiGLU MLP (F)", ge=1)
    num_layers: int = option(4, "number of transformer blocks (L; at most 1024 — published models use ≤ 128)", ge=1,
                             le=1024)
    num_heads: int = option(4, "query heads per layer (H)", ge=1)
    num_kv_heads: int = option(2, "key/value heads per layer (K): H for MHA, 1 for MQA, between for GQA", ge=1)
    head_dim: int | None = option(None, "width of one head (D); null means hidden_size / num_heads", ge=2)
    max_position_embeddings: int = option(512, "longest sequence the model accepts (tokens)", ge=1)
    rope_theta: float = option(10000.0, "RoPE base wavelength", gt=0)
    rope_scaling: dict | None = option(None, "null, or Llama 3.1 RoPE scaling: factor, low_freq_factor, "
                                             "high_freq_factor, original_max_position_embeddings")
    rms_norm_eps: float = option(1e-5, "epsilon inside RMSNorm's square root", gt=0)
    tie_embeddings: bool = option(True, "share one matrix between the token embedding and the output head")
    qkv_bias: bool = option(False, "biases on the q/k/v projections (Qwen2 style)")
    init_std: float = option(0.02, "std of the normal init; o_proj and down_proj get std / sqrt(2 * num_layers)",
                             gt=0)

    @property
    def head_size(self) -> int:
        """The head width D actually used."""
        return self.head_dim or self.hidden_size // self.num_heads

    def check(self) -> list[tuple[str, str]]:
        """Cross-field rules as (field, message) pairs; mmctl.recipe prefixes the section path."""
        problems = []
        if self.num_heads % self.num_kv_heads:
            problems.append(("num_kv_heads", f"{self.num_kv_heads} must divide num_heads ({self.num_heads})"))
        if self.head_dim is None and self.hidden_size % self.num_heads:
            problems.append(("num_heads", f"{self.num_heads} must divide hidden_size ({self.hidden_size}) "
                                          "unless head_dim is set"))
        elif self.head_size % 2:
            problems.append(("head_dim", f"{self.head_size} must be even (RoPE rotates pairs of dimensions)"))
        if self.rope_scaling is not None:
            extra = set(self.rope_scaling) - set(ROPE_SCALING_KEYS) - {"rope_type"}
            missing = [k for k in ROPE_SCALING_KEYS if k not in self.rope_scaling]
            if self.rope_scaling.get("rope_type", "llama3") != "llama3":
                problems.append(("rope_scaling", "only rope_type llama3 is supported"))
            elif extra or missing:
                problems.append(("rope_scaling", f"expected exactly the keys {', '.join(ROPE_SCALING_KEYS)}"))
            elif not all(isinstance(self.rope_scaling[k], (int, float)) and not isinstance(self.rope_scaling[k], bool)
                         and math.isfinite(self.rope_scaling[k]) and self.rope_scaling[k] > 0
                         for k in ROPE_SCALING_KEYS):
                problems.append(("rope_scaling", "every value must be a positive finite number"))
            elif not 0 < self.rope_scaling["low_freq_factor"] < self.rope_scaling["high_freq_factor"]:
                problems.append(("rope_scaling", "needs 0 < low_freq_factor < high_freq_factor"))
        return problems

    def num_parameters(self) -> int:
        """The parameter count this architecture implies (a tied head counted once), by arithmetic: a loader
        compares it with what the weight files hold before building anything."""
        C, D, F = self.hidden_size, self.head_size, self.intermediate_size
        H, K = self.num_heads, self.num_kv_heads
        attention = C * H * D + 2 * C * K * D + H * D * C + (H * D + 2 * K * D if self.qkv_bias else 0)
        block = attention + 3 * C * F + 2 * C
        head = 0 if self.tie_embeddings else self.vocab_size * C
        return self.vocab_size * C + self.num_layers * block + C + head

    @property
    def family(self) -> str:
        """The Hugging Face model_type this architecture is saved as."""
        return "qwen2" if self.qkv_bias else "llama"

    def to_hf(self) -> dict:
        """config.json fields: a `llama` model, or `qwen2` when it has q/k/v biases."""
        cfg = self
        model_type = cfg.family
        rope_scaling = None if cfg.rope_scaling is None else {"rope_type": "llama3", **cfg.rope_scaling}
        out = {
            "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
            "model_type": model_type,
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_size,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps,
            # transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters; both say the same thing.
            "rope_theta": cfg.rope_theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(rope_scaling or {})},
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": cfg.init_std,
        }
        if model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        else:
            out.update(use_sliding_window=False, sliding_window=None)
        return out

    @classmethod
    def from_hf(cls, hf: dict, name: str = "config.json") -> ModelConfig:
        """config.json fields → ModelConfig. DataError (the checkpoint is the input) for a family or feature mmctl's
        model does not have, naming the file."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED:
            raise DataError(f"{name}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
        missing = [k for k in REQUIRED if k not in hf]
        if missing:
            raise DataError(f"{name}: missing {', '.join(missing)}")
        get = {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}.get
        if get("hidden_act", "silu") != "silu":
            raise DataError(f"{name}: hidden_act {get('hidden_act')!r} is not supported (only silu)")
        if model_type == "llama" and get("attention_bias", False):
            raise DataError(f"{name}: attention_bias: true (an o_proj bias too) is not supported; "
                             "mmctl has q/k/v biases only (Qwen2)")
        if get("mlp_bias", False):
            raise DataError(f"{name}: mlp_bias: true is not supported")

        rope = {}
        for key in ("rope_parameters", "rope_scaling"):  # legacy keys win, as in transformers
            if not isinstance(hf.get(key) or {}, dict):
                raise DataError(f"{name}: {key} must be a mapping, got {type(hf[key]).__name__}")
            rope.update(hf.get(key) or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise DataError(f"{name}: rope type {rope_type!r} is not supported (supported: default, llama3)")
        theta = next(t for t in (hf.get("rope_theta"), rope.get("rope_theta"), get("rope_theta")) if t is not None)
        scaling = None
        if rope_type == "llama3":
            scaling = {k: rope.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor")}
            scaling["original_max_position_embeddings"] = rope.get("original_max_position_embeddings",
                                                                   get("max_position_embeddings"))

        window = get("sliding_window") if model_type == "mistral" or get("use_sliding_window", False) else None
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=get("num_key_value_heads", hf["num_attention_heads"]), head_dim=get("head_dim"),
            max_position_embeddings=get("max_position_embeddings"), rope_theta=theta, rope_scaling=scaling,
            rms_norm_eps=get("rms_norm_eps"), tie_embeddings=get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2", init_std=get("initializer_range", 0.02))
        from mmctl import recipe

        try:  # as strictly as a recipe: types, ranges, finite numbers — a checkpoint's config is input data
            cfg = recipe.build(cls, fields, recipe.Source(name, {}, set()))
        except UsageError as e:
            raise DataError(*e.problems) from None
        if cfg.head_dim == cfg.hidden_size // cfg.num_heads:
            cfg.head_dim = None
        if window is not None:  # full attention equals windowed attention up to the window, so stop there
            if not isinstance(window, int) or isinstance(window, bool) or window < 1:
                raise DataError(f"{name}: sliding_window must be a positive integer, got {window!r}")
            cfg.max_position_embeddings = min(cfg.max_position_embeddings, window)
        problems = cfg.check()
        if problems:
            raise DataError(*(f"{name}: {field}: {message}" for field, message in problems))
        return cfg
