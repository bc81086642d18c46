"""A Vision Transformer in SigLIP's layout (Zhai et al. 2023), the image encoder of mmctl's VLM.

An image (B, 3, H, W) is cut into P × P patches by one strided convolution (the "patch embedding": each patch's
3·P² pixels → a C-wide vector), plus a learned position embedding per patch slot — N = (H / P)² patch tokens,
no class token. Pre-LayerNorm blocks (attention over all patches, no mask: an image has no "future"), then a
GELU MLP (tanh approximation, as SigLIP), and a final LayerNorm:

    x = patch_embedding(image) + position_embedding        (B, N, C)
    x = x + attention(layer_norm1(x));  x = x + mlp(layer_norm2(x))     × num_layers
    output = post_layernorm(x)

Parameter names are transformers' `SiglipVisionModel` (embeddings.patch_embedding, encoder.layers.N.self_attn.
q_proj, …, post_layernorm), so its weights load into either without renaming. `features(images, layer)` gives
the hidden states after any block — a VLM often reads an earlier one than the last (LLaVA reads the
second-to-last): the last blocks of a contrastively trained encoder specialise in matching captions, earlier
ones keep more spatial detail.

Leaves out: SigLIP's attention-pooling head (a VLM reads the patch tokens, not one pooled vector), position
embedding interpolation for other image sizes, dropout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmctl.errors import DataError
from mmctl.recipe import option

MEAN = STD = (0.5, 0.5, 0.5)  # SigLIP's input normalisation: pixels / 255 → (x − 0.5) / 0.5, in [−1, 1]


@dataclass
class ViTConfig:
    """The encoder's shape; usable directly as a recipe's `vision:` section. Defaults make a tiny encoder."""

    image_size: int = option(32, "image side in pixels (images are resized to image_size × image_size)", ge=1,
                             le=4096)
    patch_size: int = option(4, "patch side in pixels: (image_size / patch_size)² patch tokens per image", ge=1,
                             le=4096)
    hidden_size: int = option(128, "width of each patch token (C)", ge=1, le=65536)
    intermediate_size: int = option(512, "width of the GELU MLP", ge=1, le=262144)
    num_layers: int = option(4, "transformer blocks", ge=1, le=256)
    num_heads: int = option(4, "attention heads", ge=1, le=1024)
    layer_norm_eps: float = option(1e-6, "epsilon of the LayerNorms", gt=0)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(("patch_size", f"{self.patch_size} does not divide image_size ({self.image_size})"))
        if self.hidden_size % self.num_heads:
            problems.append(("num_heads", f"{self.num_heads} does not divide hidden_size ({self.hidden_size})"))
        return problems

    def to_hf(self) -> dict:
        """transformers' SiglipVisionConfig fields."""
        return {"model_type": "siglip_vision_model", "image_size": self.image_size, "patch_size": self.patch_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads, "num_channels": 3,
                "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": self.layer_norm_eps, "attention_dropout": 0.0,
                "vision_use_head": False}

    @classmethod
    def from_hf(cls, hf: dict, name: str = "config.json") -> ViTConfig:
        """A SigLIP vision config → ViTConfig, checked as strictly as a recipe (types, ranges, heads dividing the
        width): a checkpoint's config is input data, so a problem is a DataError naming `name`."""
        from mmctl import recipe
        from mmctl.errors import UsageError

        if not isinstance(hf, dict):
            raise DataError(f"{name}: the vision config is not a mapping")
        keys = {"image_size": "image_size", "patch_size": "patch_size", "hidden_size": "hidden_size",
                "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
                "num_heads": "num_attention_heads", "layer_norm_eps": "layer_norm_eps"}
        missing = [theirs for ours, theirs in keys.items() if theirs not in hf and ours != "layer_norm_eps"]
        if missing:
            raise DataError(f"{name}: the vision config lacks {', '.join(missing)}")
        fields = {ours: hf[theirs] for ours, theirs in keys.items() if theirs in hf}
        try:
            return recipe.build(cls, fields, recipe.Source(name, {}, set()))
        except UsageError as e:
            raise DataError(*e.problems) from None


def processor_config(size: int) -> dict:
    """The preprocessing this encoder expects, as transformers' SiglipImageProcessorPil config (the exported
    checkpoint's processor; `mmctl/data/images.py` computes the same pixels)."""
    return {"image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD)}


class Embeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # (B, C, H/P, W/P)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (B, N, C), row-major patches


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                  self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        init_weights(self)

    def features(self, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Patch features (B, N, C) of `images` (B, 3, H, W) after block `layer`, counted as transformers counts
        `hidden_states`: 0 is the embeddings, i the i-th block's output, −1 the last block's, −2 the one before
        (no post_layernorm: LLaVA reads `hidden_states[vision_feature_layer]` exactly so)."""
        n = len(self.encoder.layers)
        stop = range(n + 1)[layer]  # raises IndexError for a layer that does not exist
        x = self.embeddings(images)
        for block in self.encoder.layers[:stop]:
            x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's features through post_layernorm (SigLIP's `last_hidden_state`)."""
        return self.post_layernorm(self.features(images))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Normal(0, std) weights for every linear, convolution and embedding, zero biases, unit LayerNorms (ViT and
    projector trained from scratch; PyTorch's own default gives position embeddings a std of 1, 50× a patch's)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def load_pretrained(path: str | Path) -> ViT:
    """A local SigLIP checkpoint dir — SiglipVisionModel's, or SiglipModel's (its vision half; the text tower and
    the pooling head are left out) — as a ViT with its weights and its config."""
    from safetensors import SafetensorError, safe_open

    from mmctl import hf

    path = Path(path)
    config = hf.read_json(path / "config.json")
    vision = config.get("vision_config", {}) if config.get("model_type") == "siglip" else config
    if vision.get("model_type", config.get("model_type")) not in ("siglip_vision_model", "siglip"):
        raise DataError(f"{path / 'config.json'}: not a SigLIP checkpoint (model_type {config.get('model_type')!r})")
    try:
        model = ViT(ViTConfig.from_hf(vision, str(path / "config.json")))
    except KeyError as e:
        raise DataError(f"{path / 'config.json'}: the vision config lacks {e}") from None
    wanted = model.state_dict()
    found = {}
    for file, names in hf.weight_files(path).items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names or f.keys():
                    ours = name.removeprefix("vision_model.")
                    if ours in wanted:
                        found[ours] = f.get_tensor(name).float()
        except (SafetensorError, OSError) as e:
            raise DataError(f"{file}: cannot read safetensors: {e}") from None
    for name, t in wanted.items():
        if name not in found:
            raise DataError(f"{path}: tensor {name} (or vision_model.{name}) is missing")
        if found[name].shape != t.shape:
            raise DataError(f"{path}: tensor {name} has shape {list(found[name].shape)}, config.json implies "
                            f"{list(t.shape)}")
    model.load_state_dict(found)
    return model
