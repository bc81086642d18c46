"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023).

A wrapped projection computes y = W x + (α / r) · B A dropout(x), with A (r × in) and B (out × r) trained and W
frozen. B starts at zero, so a freshly wrapped model computes exactly what the base model does. rsLoRA scales by
α / √r instead of α / r, so the update's size does not shrink as the rank grows.

Layout and files follow PEFT, so each side loads the other's adapters: the wrapped module keeps the original
layer as `base_layer` beside `lora_A` and `lora_B`; `save_adapter` writes `adapter_config.json` and
`adapter_model.safetensors` with PEFT's key names (`base_model.model.<module>.lora_A.weight`), which
`peft.PeftModel.from_pretrained(base, dir)` reads. `merge` folds B A into W for an ordinary checkpoint.

QLoRA is this with a frozen base in 4 bits (`mmctl/quant/bnb.py` swaps the layers before they are wrapped):
the adapters are the same, and merging dequantizes W first.

LoRA trains no embedding, so a token whose row the task needs changed — a chat marker the base never saw, a digit
whose meaning sharpens — stays as the base left it. `trainable_tokens` trains those rows alone (PEFT's
`trainable_token_indices`, saved so PEFT loads it): the embedding stays frozen, the listed rows' new values are
parameters written over it on the fly, and a head tied to the embedding reads the same new rows (as PEFT's does).

Leaves out: DoRA, LoRA on embeddings, per-module ranks (PEFT's rank_pattern), bias training.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmctl.errors import DataError, UsageError
from mmctl.quant import bnb
from mmctl.recipe import option

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    r: int = option(16, "rank of each adapter (columns of B, rows of A)", ge=1, le=2**16)
    alpha: float = option(32.0, "scale numerator: the update is (alpha / r) · B A x (alpha / √r with rslora)", gt=0)
    dropout: float = option(0.0, "dropout on the adapter's input during training", ge=0, lt=1)
    target_modules: list[str] = option(TARGETS, "module names to wrap (the last part of the name): default every "
                                                "attention and MLP projection")
    rslora: bool = option(False, "rank-stabilised scaling alpha / √r (Kalajdzievski 2023)")
    trainable_tokens: list[str] = option([], "tokens whose embedding rows train beside the adapters (PEFT's "
                                             "trainable_token_indices), each one token of the base's tokenizer: the "
                                             "chat markers, the digits, …")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def check(self) -> list[tuple[str, str]]:
        return [] if self.target_modules else [("target_modules", "at least one module name")]


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update. Shapes: x (…, in) → (…, out)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = scaling
        self.enabled = True  # False inside `disabled(model)`: the base layer alone
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's (and nn.Linear's) default for A
        nn.init.zeros_(self.lora_B.weight)  # so the wrapped model starts as the base model
        base.requires_grad_(False)

    @classmethod
    def from_linear(cls, base: nn.Linear, cfg: LoRAConfig) -> LoRALinear:
        return cls(base, cfg.r, cfg.scaling, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled:
            return out
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        # in the base output's dtype: under bf16 autocast an fp32 input would otherwise promote the sum, and all
        # that follows, to fp32
        return out + (self.scaling * update).to(out.dtype)

    def merged(self) -> nn.Linear:
        """The plain linear layer W + scaling · B A (in W's dtype; a 4-bit W is dequantized first, as QLoRA's
        merged export is)."""
        base = self.base_layer
        weight = bnb.dequantized(base) if bnb.is_4bit(base) else base.weight
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype).requires_grad_(False)
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
            merged.weight.copy_((weight.float() + delta).to(weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged


class TrainableTokens(nn.Module):
    """A frozen nn.Embedding whose rows `indices` train (PEFT's TrainableTokensLayer): `delta` holds those rows'
    values (PEFT's name; values, not differences), written over the base's rows on the fly."""

    def __init__(self, base: nn.Embedding, indices: list[int]):
        super().__init__()
        self.base_layer = base
        self.register_buffer("indices", torch.tensor(indices, dtype=torch.long, device=base.weight.device),
                             persistent=False)
        self.delta = nn.Parameter(base.weight.detach()[self.indices].clone())
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        if not self.enabled:
            return self.base_layer.weight
        return self.base_layer.weight.index_copy(0, self.indices, self.delta.to(self.base_layer.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class TiedHead(nn.Module):
    """An LM head tied to a TrainableTokens embedding: the logits read the same rows, trained ones included."""

    def __init__(self, tokens: TrainableTokens):
        super().__init__()
        self._tokens = [tokens]  # a plain list: the embedding's parameters stay registered once, under its name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._tokens[0].weight)


def token_ids(tok, tokens: list[str]) -> list[int]:
    """The ids of `lora.trainable_tokens`: a special token by its string, any other by its one-token encoding."""
    ids = []
    for t in tokens:
        found = tok.token_id(t)
        if found is None:
            encoded = tok.encode(t)
            if len(encoded) != 1:
                raise UsageError(f"lora.trainable_tokens: {t!r} is {len(encoded)} tokens of the base's tokenizer, "
                                 "not one")
            found = encoded[0]
        ids.append(found)
    return sorted(set(ids))


def apply_lora(model: nn.Module, cfg: LoRAConfig, trainable_ids: list[int] = ()) -> list[str]:
    """Freeze `model` and wrap every nn.Linear whose name ends in one of cfg.target_modules, and the embedding's
    rows `trainable_ids` (a tied head reads them too); returns the wrapped layers' names."""
    model.requires_grad_(False)
    shared = {}  # parameters used under two names (a head tied to the embeddings)
    for _, p in model.named_parameters(remove_duplicate=False):
        shared[id(p)] = shared.get(id(p), 0) + 1
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in cfg.target_modules and isinstance(module, nn.Linear):
            if shared.get(id(module.weight), 0) > 1:
                raise UsageError(f"lora.target_modules: {name} shares its weight with another module (tied "
                                 "embeddings); merging would untie them")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear.from_linear(module, cfg))
            wrapped.append(name)
    missing = sorted(set(cfg.target_modules) - {n.rsplit(".", 1)[-1] for n in wrapped})
    if missing:
        raise UsageError(f"lora.target_modules: no linear layer is named {', '.join(missing)}")
    if trainable_ids:
        embed = model.model.embed_tokens
        tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is embed.weight
        if max(trainable_ids) >= embed.num_embeddings or min(trainable_ids) < 0:
            raise UsageError(f"trainable token ids must be below the vocabulary size ({embed.num_embeddings})")
        model.model.embed_tokens = TrainableTokens(embed, list(trainable_ids))
        if tied:
            model.lm_head = TiedHead(model.model.embed_tokens)
    return wrapped


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base inside this block: every adapter skipped (an RL run's reference model without a
    second copy in memory, as PEFT's `disable_adapter()`)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear | TrainableTokens)]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def merge(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged nn.Linear and trained token rows by a plain embedding (the head
    tied to it again), in place: the model's names are the base's again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    tokens = getattr(getattr(model, "model", None), "embed_tokens", None)
    if isinstance(tokens, TrainableTokens):
        embed = tokens.base_layer
        with torch.no_grad():
            embed.weight.copy_(tokens.weight)
        model.model.embed_tokens = embed
        if isinstance(model.lm_head, TiedHead):
            model.lm_head = nn.Linear(embed.embedding_dim, embed.num_embeddings, bias=False,
                                      device=embed.weight.device, dtype=embed.weight.dtype)
            model.lm_head.weight = embed.weight
    return model


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights (and trained token rows) under PEFT's names."""
    return {f"base_model.model.{name}": p.detach() for name, p in model.named_parameters()
            if name.endswith(("lora_A.weight", "lora_B.weight"))} | {
        f"base_model.model.{name}.token_adapter.trainable_tokens_delta": m.delta.detach()
        for name, m in model.named_modules() if isinstance(m, TrainableTokens)}


def _param_name(peft_name: str) -> str:
    """A PEFT tensor name → this model's parameter name."""
    return peft_name.removeprefix("base_model.model.").replace(".token_adapter.trainable_tokens_delta", ".delta")


def save_adapter(model: nn.Module, out: str | Path, cfg: LoRAConfig, base_model: str | None = None) -> Path:
    """Write `out/` (adapter_config.json + adapter_model.safetensors) as PEFT writes an adapter."""
    from mmctl.artifacts import atomic_write_json, publish_dir, save_tensors

    names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})
    if base_model is not None and Path(base_model).exists():  # PEFT resolves it from wherever the adapter is opened
        base_model = str(Path(base_model).resolve())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
              "target_modules": names, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
              "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
              "trainable_token_indices": next((m.indices.tolist() for m in model.modules()
                                               if isinstance(m, TrainableTokens)), None)}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_tensors(adapter_tensors(model), tmp / ADAPTER_WEIGHTS)
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
        return publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Wrap `model` as adapter dir `path` (PEFT's format, written by mmctl or by PEFT) says, and load its weights."""
    from mmctl import hf

    path = Path(path)
    config = hf.read_json(path / ADAPTER_CONFIG)
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("rank_pattern") or \
            config.get("alpha_pattern") or config.get("layers_to_transform") is not None:
        raise DataError(f"{path / ADAPTER_CONFIG}: only plain LoRA adapters are supported (no DoRA, no per-module "
                        "ranks, no layers_to_transform)")
    from mmctl import recipe

    fields = {"r": config.get("r"), "alpha": config.get("lora_alpha"), "dropout": config.get("lora_dropout") or 0.0,
              "target_modules": config.get("target_modules"), "rslora": config.get("use_rslora", False)}
    rows = config.get("trainable_token_indices") or []
    if isinstance(rows, dict) and set(rows) <= {"embed_tokens"}:
        rows = rows.get("embed_tokens") or []
    if not isinstance(rows, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in rows):
        raise DataError(f"{path / ADAPTER_CONFIG}: trainable_token_indices must be a list of token ids (or "
                        "{\"embed_tokens\": [ids]})")
    try:  # the adapter's config is input data: its problems are exit 3, like a checkpoint's config.json
        cfg = recipe.build(LoRAConfig, fields, recipe.Source(str(path / ADAPTER_CONFIG), {}, set()))
        apply_lora(model, cfg, sorted(set(rows)))
    except UsageError as e:
        raise DataError(*(f"{path / ADAPTER_CONFIG}: {p}" for p in e.problems)) from None
    expected = {name: tuple(t.shape) for name, t in adapter_tensors(model).items()}
    tensors = hf.read_tensors(path, expected, weights=ADAPTER_WEIGHTS)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[_param_name(name)].copy_(tensor)
    return cfg
