"""open_clip's plain ViT image tower, rebuilt without importing open_clip.

Importing open_clip imports torchvision (and through it ``torch._dynamo``) and transformers:
4 s on an idle CPU core, 12 s on a loaded one, in every process that loads a tokenizer, such as
each pre-tokenize actor. A
tokenizer loaded from our own weights file replaces every tower weight, so it needs only the
tower's structure. :func:`build_plain_vit` builds open_clip's default ViT (plain residual
blocks, learnable positions, class-token pooling) with open_clip's parameter names and the same
operations in the same order, so it gives the same tokens from the same weights. For any other
architecture it returns None and the caller builds the tower with open_clip.
"""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# open_clip's CLIPVisionCfg fields that shape this tower, at open_clip's defaults.
SHAPE_DEFAULTS: dict[str, Any] = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0,
                                  "patch_size": 16, "image_size": 224}
# The other CLIPVisionCfg fields that change the tower, and the values at which this tower is
# open_clip's (the feature off).
PLAIN_VALUES: dict[str, tuple[Any, ...]] = {
    "ls_init_value": (None,), "patch_dropout": (0.0,), "attentional_pool": (False,), "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",), "final_ln_after_pool": (False,), "pool_type": ("tok",),
    "act_kwargs": (None,), "norm_kwargs": (None,), "block_type": (None, "default"), "qk_norm": (False,),
    "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,), "timm_model_name": (None,),
}
# CLIPVisionCfg fields that do not change a plain ViT tower.
UNUSED_FIELDS = frozenset({"output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
                           "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"})


def open_clip_model_config(arch: str) -> dict[str, Any] | None:
    """open_clip's built-in config file for ``arch`` (what ``open_clip.get_model_config``
    returns for a built-in name), read without importing open_clip; None when there is none."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model_configs" / f"{arch}.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return config if all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")) else None


def _is_plain(vision_cfg: dict[str, Any]) -> bool:
    """True when ``vision_cfg`` describes a tower this module builds exactly as open_clip does."""
    known = SHAPE_DEFAULTS.keys() | PLAIN_VALUES.keys() | UNUSED_FIELDS
    shape = {**SHAPE_DEFAULTS, **vision_cfg}
    return (vision_cfg.keys() <= known
            and all(vision_cfg.get(k, values[0]) in values for k, values in PLAIN_VALUES.items())
            and all(isinstance(shape[k], int) and not isinstance(shape[k], bool)
                    for k in ("layers", "width", "head_width", "patch_size", "image_size")))


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: ``F.layer_norm``, the result cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The GELU approximation of the OpenAI CLIP weights (``quick_gelu`` model configs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """Pre-norm self-attention and MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, mlp_width)), ("gelu", act()), ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.ln_1(x)
        x = x + self.attn(q, q, q, need_weights=False, attn_mask=None)[0]
        return x + self.mlp(self.ln_2(x))


class PlainViT(nn.Module):
    """Images (normalised) -> patch tokens after the final LayerNorm, [B, grid*grid, width].

    Parameters are zeros until a state dict is loaded; ``proj`` maps tokens to the output space.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_width: int, output_dim: int, act: type[nn.Module]):
        super().__init__()
        self.patch_size = patch_size
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = nn.ModuleDict(
            {"resblocks": nn.ModuleList(ResidualBlock(width, heads, mlp_width, act) for _ in range(layers))})
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer["resblocks"]:
            x = block(x)
        return self.ln_post(x)[:, 1:]


def build_plain_vit(model_cfg: dict[str, Any], vision_cfg: dict[str, Any]) -> tuple[PlainViT, int, int] | None:
    """The image tower open_clip builds (fp32) from the model config ``model_cfg`` with its
    ``vision_cfg`` replaced, as ``(tower, token width, output width)``; None when that tower is
    not a plain ViT."""
    if not _is_plain(vision_cfg):
        return None
    v = {**SHAPE_DEFAULTS, **vision_cfg}
    act = QuickGELU if model_cfg.get("quick_gelu", False) else nn.GELU
    output_dim = int(model_cfg["embed_dim"])
    tower = PlainViT(v["image_size"], v["patch_size"], v["width"], v["layers"], v["width"] // v["head_width"],
                     int(v["width"] * v["mlp_ratio"]), output_dim, act)
    return tower, v["width"], output_dim
