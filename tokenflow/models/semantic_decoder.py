"""Small ViT mapping quantized semantic codes to the teacher's feature space."""

from __future__ import annotations

import torch
from torch import nn

from tokenflow.config import SemanticDecoderConfig


def _task_head(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.Tanh(), nn.Linear(dim_in, dim_out))


class SemanticDecoder(nn.Module):
    """[B, C, g, g] codes -> [B, g*g, target_dim] predicted teacher tokens."""

    def __init__(self, cfg: SemanticDecoderConfig, code_dim: int, grid: int, target_dim: int):
        super().__init__()
        self.embed = nn.Linear(code_dim, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width,
            cfg.heads,
            dim_feedforward=int(cfg.width * cfg.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = _task_head(cfg.width, target_dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 1:])


def semantic_projection(token_dim: int, code_dim: int) -> nn.Sequential:
    """Encoder-side task layer: tower tokens -> code_dim semantic latent."""
    return _task_head(token_dim, code_dim)
