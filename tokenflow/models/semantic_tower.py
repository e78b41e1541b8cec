"""Semantic vision towers (open_clip or transformers) exposing patch-token grids.

A tower is built either from pretrained weights (a local path, an open_clip tag or a hub id:
the cluster path) or randomly initialised from its architecture config (tests, smoke). Nothing
is downloaded unless the configured source asks for it. A tower whose weights are loaded right
after (``structure_only``) is, when it is open_clip's plain ViT, built without importing open_clip
(:mod:`tokenflow.models.clip_vision`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

from tokenflow.config import ConfigError, SemanticEncoderConfig
from tokenflow.models.clip_vision import PlainViT, build_plain_vit, open_clip_model_config

log = logging.getLogger(__name__)

# A text tower is built with every open_clip model but never used here; when weights are not
# loaded (random init) a minimal one keeps construction cheap.
_MINIMAL_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}


class SemanticTower(nn.Module):
    """Wraps a vision backbone; ``tokens`` feeds the student, ``target`` is the distillation target.

    ``architecture`` holds the resolved architecture fields: set as ``overrides`` with
    ``pretrained: null`` they rebuild the same tower without its pretrained source.
    ``structure_only``: every weight is loaded right after, so the tower need not be initialised;
    open_clip's plain ViT is then built without importing open_clip.
    """

    def __init__(self, cfg: SemanticEncoderConfig, image_size: int, structure_only: bool = False):
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size
        self.grid = image_size // cfg.patch_size
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.backbone, self.token_dim, self.target_dim, self.architecture = _build(cfg, image_size, structure_only)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> patch tokens [B, grid*grid, token_dim] (prefix tokens removed)."""
        x = self._normalize(images)
        if self.cfg.backend == "open_clip":
            out = _open_clip_tokens(self.backbone, x)
        else:
            hidden = self.backbone(pixel_values=x, output_hidden_states=True).hidden_states
            out = hidden[self.cfg.feature_layer]
        n = self.grid * self.grid
        if out.shape[1] < n:
            raise RuntimeError(f"tower returned {out.shape[1]} tokens, expected a {self.grid}^2 grid")
        return out[:, out.shape[1] - n :]

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Distillation target [B, grid*grid, target_dim]: tokens in the tower's output space."""
        tokens = self.tokens(images)
        proj = getattr(self.backbone, "proj", None)
        if self.cfg.backend == "open_clip" and isinstance(proj, torch.Tensor):
            return tokens @ proj
        return tokens


def _open_clip_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(visual, PlainViT):
        return visual(x)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:  # timm towers (e.g. ViTamin)
        return trunk.forward_features(x)
    visual.output_tokens = True
    _, tokens = visual(x)
    return tokens


_Built = tuple[nn.Module, int, int, dict[str, Any]]


@contextlib.contextmanager
def _root_logging_at(level: int) -> Iterator[None]:
    """open_clip logs its construction steps on the root logger; keep them out of ours."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)


def _build(cfg: SemanticEncoderConfig, image_size: int, structure_only: bool) -> _Built:
    if cfg.backend == "transformers":
        return _build_transformers(cfg, image_size)
    if structure_only and cfg.pretrained is None and (base := open_clip_model_config(cfg.arch)) is not None:
        vision_cfg = _open_clip_vision_cfg(cfg, base, image_size)
        if (built := build_plain_vit(base, vision_cfg)) is not None:
            return *built, vision_cfg
    return _build_open_clip(cfg, image_size)


def _open_clip_vision_cfg(cfg: SemanticEncoderConfig, base: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The open_clip ``vision_cfg`` of this tower: the named model's, with ``cfg``'s overrides."""
    vision_cfg = {**base["vision_cfg"], **cfg.overrides, "image_size": image_size}
    if cfg.pretrained is None and "timm_model_name" not in vision_cfg:
        vision_cfg["patch_size"] = cfg.patch_size
    return vision_cfg


def _build_open_clip(cfg: SemanticEncoderConfig, image_size: int) -> _Built:
    import open_clip

    base = open_clip.get_model_config(cfg.arch)
    if base is None:
        raise ConfigError(f"semantic_encoder.arch: open_clip has no model named {cfg.arch!r}")
    vision_cfg = _open_clip_vision_cfg(cfg, base, image_size)
    kwargs: dict[str, Any] = {"force_image_size": image_size, "vision_cfg": vision_cfg}
    if cfg.pretrained is None:
        kwargs["text_cfg"] = _MINIMAL_TEXT_CFG
    log.info("building open_clip %s tower (%s)", cfg.arch, cfg.pretrained or "random init")
    with _root_logging_at(logging.WARNING):
        model = open_clip.create_model(cfg.arch, pretrained=cfg.pretrained, **kwargs)
    visual = model.visual
    del model
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        width = int(trunk.num_features)
        return visual, width, width, vision_cfg
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    if patch != cfg.patch_size:
        raise ConfigError(
            f"semantic_encoder.patch_size is {cfg.patch_size} but {cfg.arch} uses {patch}"
        )
    width = int(visual.ln_post.normalized_shape[0])
    target = int(visual.proj.shape[1]) if isinstance(visual.proj, torch.Tensor) else width
    return visual, width, target, vision_cfg


# Bookkeeping fields of a transformers config that are not architecture.
_NOT_ARCHITECTURE = {"model_type", "transformers_version", "architectures", "_name_or_path", "dtype"}


def _build_transformers(cfg: SemanticEncoderConfig, image_size: int) -> _Built:
    from transformers import AutoConfig, AutoModel

    if cfg.pretrained is None:
        config = AutoConfig.for_model(
            cfg.arch, **{**cfg.overrides, "image_size": image_size, "patch_size": cfg.patch_size}
        )
        model = AutoModel.from_config(config)
    else:
        model = AutoModel.from_pretrained(cfg.pretrained, **cfg.overrides)
    if not type(model).__name__.endswith("VisionModel"):  # a full dual-tower checkpoint
        model = model.vision_model
    config = model.config
    if getattr(config, "patch_size", cfg.patch_size) != cfg.patch_size:
        raise ConfigError(
            f"semantic_encoder.patch_size is {cfg.patch_size} but {cfg.arch} uses {config.patch_size}"
        )
    width = int(config.hidden_size)
    architecture = {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    return model, width, width, architecture
