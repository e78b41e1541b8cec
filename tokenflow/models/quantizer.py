"""Shared-mapping multi-scale residual quantizer (TokenFlow).

Two L2-normalised codebooks (semantic and pixel) share one index per position: the index that
minimises d_sem + w * d_pix (squared L2 between normalised vectors). Quantization is VAR-style
multi-scale residual, as in the reference implementation: the residual starts as the raw
latent; at each scale it is area-downsampled, each half normalised for the lookup, the chosen
unit-norm codes upsampled bicubically to the full grid, accumulated, and subtracted from the
(raw) residual. The residual's norm after each scale, relative to the latent's
(:class:`ResidualProfile`), shows whether the scales share the image out: it must fall scale
by scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow.config import QuantizerConfig

# Rows of positions scored against the codebook at once: bounds the [rows, K] distance matrix.
_DISTANCE_CHUNK = 4096


class ResidualProfile(NamedTuple):
    """Sums of squares over a batch, per half (semantic, pixel): of the raw latent ([2]) and of
    the residual left after each quantized scale ([scales used, 2]); ``scales`` are (index, side)
    of the scales used, ``positions`` counts the latent's grid positions summed over. Profiles of
    several batches over the same scales add up (:meth:`add`)."""

    latent_sq: torch.Tensor
    residual_sq: torch.Tensor
    scales: tuple[tuple[int, int], ...]
    positions: int

    def add(self, other: "ResidualProfile") -> "ResidualProfile":
        if other.scales != self.scales:
            raise ValueError(f"cannot add profiles over scales {self.scales} and {other.scales}")
        return ResidualProfile(self.latent_sq + other.latent_sq, self.residual_sq + other.residual_sq,
                               self.scales, self.positions + other.positions)

    def metrics(self) -> dict[str, float]:
        """``residual/<half>/scale_<i>_<s>``: ||r|| / ||latent|| after scale i (side s), and
        ``latent_norm/<half>``: the latent's root-mean-square norm per position."""
        out: dict[str, float] = {}
        for h, half in enumerate(("semantic", "pixel")):
            total = float(self.latent_sq[h])
            out[f"latent_norm/{half}"] = (total / max(self.positions, 1)) ** 0.5
            for row, (i, size) in enumerate(self.scales):
                out[f"residual/{half}/scale_{i}_{size}"] = (float(self.residual_sq[row, h]) / max(total, 1e-30)) ** 0.5
        return out


class QuantizerOutput(NamedTuple):
    """What one quantization pass gives back (a NamedTuple, so ZeRO-3 hooks see its tensors)."""

    features: torch.Tensor  # [B, Ds + Dp, H, W] accumulated codes (straight-through in training)
    indices: dict[int, torch.Tensor]  # scale -> [B, s*s] indices of the scales used
    vq_loss: torch.Tensor  # codebook term, mean over used scales
    commit_loss: torch.Tensor  # beta-weighted commitment term, mean over used scales
    profile: ResidualProfile  # detached residual diagnostics of the scales used


def resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize a [B, C, h, w] map to size x size; identity when already that size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False)


class SharedMappingQuantizer(nn.Module):
    """Dual-codebook quantizer with one shared index per position, over a list of scales."""

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.scales = tuple(cfg.scales)
        self.split = (cfg.semantic_dim, cfg.pixel_dim)
        # Direct parameters (not nn.Embedding): ZeRO-3 gathers a module's own parameters for its
        # forward and backward, and the codebooks are only ever read inside this module.
        k = cfg.codebook_size
        def init(dim: int) -> nn.Parameter:
            return nn.Parameter(F.normalize(torch.empty(k, dim).uniform_(-1 / k, 1 / k), dim=1))

        self.semantic_codebook = init(cfg.semantic_dim)
        self.pixel_codebook = init(cfg.pixel_dim)

    @property
    def grid(self) -> int:
        return self.scales[-1]

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two L2-normalised codebooks, [K, Ds] and [K, Dp]."""
        return (
            F.normalize(self.semantic_codebook, dim=1),
            F.normalize(self.pixel_codebook, dim=1),
        )

    def nearest(self, z_sem: torch.Tensor, z_pix: torch.Tensor) -> torch.Tensor:
        """Shared index per row: argmin over K of ||z_sem - e_sem||^2 + w ||z_pix - e_pix||^2.

        ``z_sem`` [M, Ds] and ``z_pix`` [M, Dp] are compared as given (callers normalise).
        """
        e_sem, e_pix = self.codes()
        w = self.cfg.pixel_distance_weight
        e_sq = e_sem.pow(2).sum(1) + w * e_pix.pow(2).sum(1)
        out = torch.empty(z_sem.shape[0], dtype=torch.long, device=z_sem.device)
        for start in range(0, z_sem.shape[0], _DISTANCE_CHUNK):
            zs, zp = z_sem[start : start + _DISTANCE_CHUNK], z_pix[start : start + _DISTANCE_CHUNK]
            z_sq = zs.pow(2).sum(1, keepdim=True) + w * zp.pow(2).sum(1, keepdim=True)
            dist = z_sq + e_sq - 2.0 * (zs @ e_sem.T + w * (zp @ e_pix.T))
            out[start : start + _DISTANCE_CHUNK] = dist.argmin(dim=1)
        return out

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [...] -> concatenated normalised code vectors [..., Ds + Dp]."""
        e_sem, e_pix = self.codes()
        return torch.cat([e_sem[indices], e_pix[indices]], dim=-1)

    def _quantize_scale(self, rest: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize the residual at one scale: (normalised input, code vectors, indices)."""
        b, c = rest.shape[:2]
        z = resize(rest, size, "area").permute(0, 2, 3, 1).reshape(-1, c)
        z_sem, z_pix = z.split(self.split, dim=1)
        z = torch.cat([F.normalize(z_sem, dim=1), F.normalize(z_pix, dim=1)], dim=1)
        idx = self.nearest(*z.split(self.split, dim=1))
        return z, self.lookup(idx), idx.view(b, size * size)

    def forward(self, features: torch.Tensor, drop_scale: int | None = None) -> QuantizerOutput:
        """Quantize a [B, Ds+Dp, H, W] latent over all scales except ``drop_scale`` (an index)."""
        b, c, h, w = features.shape
        if h != self.grid or w != self.grid:
            raise ValueError(f"latent grid {h}x{w} does not match the last scale {self.grid}")
        if drop_scale == 0:
            raise ValueError("the first scale is never dropped")
        rest = features
        accumulated = torch.zeros_like(features)
        vq_terms, commit_terms = [], []
        indices: dict[int, torch.Tensor] = {}
        residual_sq = []
        for i, size in enumerate(self.scales):
            if i == drop_scale:
                continue
            z, zq, idx = self._quantize_scale(rest, size)
            vq_terms.append(F.mse_loss(zq, z.detach()))
            commit_terms.append(F.mse_loss(z, zq.detach()))
            zq_st = zq + (z - z.detach())  # straight-through: value exactly zq, gradient to z
            up = resize(zq_st.view(b, size, size, c).permute(0, 3, 1, 2), self.grid, "bicubic")
            accumulated = accumulated + up
            rest = rest - up.detach()
            indices[size] = idx
            residual_sq.append(self._half_sq(rest))
        used = tuple((i, s) for i, s in enumerate(self.scales) if i != drop_scale)
        profile = ResidualProfile(self._half_sq(features), torch.stack(residual_sq), used, b * h * w)
        return QuantizerOutput(
            features=accumulated,
            indices=indices,
            vq_loss=torch.stack(vq_terms).mean(),
            commit_loss=self.cfg.beta * torch.stack(commit_terms).mean(),
            profile=profile,
        )

    def _half_sq(self, x: torch.Tensor) -> torch.Tensor:
        """Sums of squares of a [B, Ds+Dp, H, W] map's two halves, [2], detached."""
        with torch.no_grad():
            return torch.stack([part.float().pow(2).sum() for part in x.split(self.split, dim=1)])

    def tokens_to_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Flat tokens [B, sum s^2] -> accumulated code features [B, Ds+Dp, grid, grid]."""
        return CodebookFeatures.from_quantizer(self).tokens_to_features(tokens)


def upsample_codes(codes: torch.Tensor, size: int, grid: int) -> torch.Tensor:
    """One scale's code vectors [B, size*size, D] -> bicubically upsampled [B, D, grid, grid]."""
    b = codes.shape[0]
    return resize(codes.reshape(b, size, size, -1).permute(0, 3, 1, 2), grid, "bicubic")


class CodebookFeatures(nn.Module):
    """A trained quantizer's code vectors, frozen, for the models that read its tokens.

    The codebooks are buffers (never trained, never partitioned by ZeRO-3). Besides the final
    accumulated features (understanding input) this gives the next-scale teacher-forcing inputs
    of generation: for scale j > 0, the features accumulated over scales < j, area-downsampled
    to j's grid.
    """

    def __init__(self, scales: tuple[int, ...], semantic_codes: torch.Tensor, pixel_codes: torch.Tensor):
        super().__init__()
        self.scales = tuple(scales)
        self.register_buffer("semantic", F.normalize(semantic_codes.detach().float(), dim=1).clone())
        self.register_buffer("pixel", F.normalize(pixel_codes.detach().float(), dim=1).clone())

    @classmethod
    def from_quantizer(cls, quantizer: SharedMappingQuantizer,
                       scales: tuple[int, ...] | None = None) -> "CodebookFeatures":
        """The quantizer's codes over its own scales, or over ``scales`` (those of a view)."""
        return cls(scales or quantizer.scales, quantizer.semantic_codebook, quantizer.pixel_codebook)

    @property
    def grid(self) -> int:
        return self.scales[-1]

    @property
    def dim(self) -> int:
        return self.semantic.shape[1] + self.pixel.shape[1]

    @property
    def codebook_size(self) -> int:
        return self.semantic.shape[0]

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    def split_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Flat scale-major tokens [B, sum s^2] -> per-scale [B, s*s] views."""
        if tokens.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens per image, got {tokens.shape[-1]}")
        return list(tokens.split([s * s for s in self.scales], dim=-1))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [...] -> concatenated code vectors [..., Ds + Dp]."""
        return torch.cat([self.semantic[indices], self.pixel[indices]], dim=-1)

    def accumulate(self, scale_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Features [B, D, grid, grid] accumulated over the first ``len(scale_tokens)`` scales."""
        accumulated = None
        for size, idx in zip(self.scales, scale_tokens):
            up = upsample_codes(self.lookup(idx), size, self.grid)
            accumulated = up if accumulated is None else accumulated + up
        return accumulated.contiguous()  # same memory layout as the quantizer's forward

    def tokens_to_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Flat tokens [B, sum s^2] -> accumulated code features [B, D, grid, grid]."""
        return self.accumulate(self.split_tokens(tokens))

    def scale_input(self, scale_tokens: list[torch.Tensor], scale: int) -> torch.Tensor:
        """Teacher-forcing input of scale index ``scale`` > 0: [B, s*s, D] from the features
        accumulated over ``scale_tokens`` (the scales before it, or with a draft of it)."""
        size = self.scales[scale]
        down = resize(self.accumulate(scale_tokens), size, "area")
        return down.flatten(2).transpose(1, 2)

    def next_scale_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs of every scale after the first: [B, sum_{j>0} s_j^2, D]."""
        per_scale = self.split_tokens(tokens)
        return torch.cat([self.scale_input(per_scale[:j], j) for j in range(1, len(self.scales))], dim=1)
