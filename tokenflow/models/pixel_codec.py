"""VQGAN-style convolutional pixel encoder and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow.config import PixelCodecConfig


def _norm(channels: int) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else max(g for g in (16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a (1x1 when widths differ) skip."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).permute(1, 0, 3, 2).unbind(0)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        return x + self.proj(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) padding."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(ch: int, attn: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(ch, ch, dropout)]
    if attn:
        layers.append(AttnBlock(ch))
    layers.append(ResBlock(ch, ch, dropout))
    return nn.Sequential(*layers)


class PixelEncoder(nn.Module):
    """Images in [-1, 1] -> z_channels latent at 1/downsample_factor resolution."""

    def __init__(self, cfg: PixelCodecConfig, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, cfg.ch, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = cfg.ch
        last = len(cfg.ch_mult) - 1
        for level, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, out, cfg.dropout))
                ch = out
                if level == last and cfg.attn_at_bottom:
                    blocks.append(AttnBlock(ch))
            if level != last:
                blocks.append(Downsample(ch))
        self.down = nn.Sequential(*blocks)
        self.mid = _mid_block(ch, cfg.attn_at_bottom, cfg.dropout)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class PixelDecoder(nn.Module):
    """z_channels latent -> images in [-1, 1] (unclamped). Mirrors the encoder, one extra block per level."""

    def __init__(self, cfg: PixelCodecConfig, out_channels: int = 3):
        super().__init__()
        base = cfg.decoder_ch or cfg.ch
        n_blocks = (cfg.decoder_num_res_blocks or cfg.num_res_blocks) + 1
        ch = base * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = _mid_block(ch, cfg.attn_at_bottom, cfg.dropout)
        blocks: list[nn.Module] = []
        levels = list(enumerate(cfg.ch_mult))[::-1]
        for level, mult in levels:
            out = base * mult
            for _ in range(n_blocks):
                blocks.append(ResBlock(ch, out, cfg.dropout))
                ch = out
                if level == len(cfg.ch_mult) - 1 and cfg.attn_at_bottom:
                    blocks.append(AttnBlock(ch))
            if level != 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))
