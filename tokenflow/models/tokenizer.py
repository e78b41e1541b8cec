"""The TokenFlow tokenizer: dual encoders, shared-mapping quantizer, dual decoders."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from tokenflow.config import TokenizerConfig
from tokenflow.models.codebook_usage import CodebookUsage
from tokenflow.models.pixel_codec import PixelDecoder, PixelEncoder
from tokenflow.models.quantizer import QuantizerOutput, ResidualProfile, SharedMappingQuantizer, resize
from tokenflow.models.semantic_decoder import SemanticDecoder, semantic_projection
from tokenflow.models.semantic_tower import SemanticTower


class TokenizerOutput(NamedTuple):
    """One forward pass (a NamedTuple, so ZeRO-3 hooks see its tensors). Images are in [-1, 1]
    here; the public API speaks [0, 1]."""

    reconstruction: torch.Tensor  # [B, 3, H, W], unclamped, [-1, 1] range
    semantic_prediction: torch.Tensor  # [B, g*g, T] predicted teacher tokens
    semantic_target: torch.Tensor | None  # [B, g*g, T] frozen-teacher tokens (None without teacher)
    indices: dict[int, torch.Tensor]  # scale -> [B, s*s]
    vq_loss: torch.Tensor
    commit_loss: torch.Tensor
    profile: ResidualProfile  # per-scale residual diagnostics of the scales used


class TokenFlowTokenizer(nn.Module):
    """Images in [0, 1] -> one index per position and scale, and back.

    ``with_teacher=False`` builds the inference-only model (no frozen distillation teacher).
    ``structure_only=True`` when every weight is loaded right after (see :class:`SemanticTower`).
    """

    def __init__(self, cfg: TokenizerConfig, with_teacher: bool = True, structure_only: bool = False):
        super().__init__()
        self.cfg = cfg
        q = cfg.quantizer
        self.semantic_encoder = SemanticTower(cfg.semantic_encoder, cfg.image_size, structure_only)
        self.semantic_proj = semantic_projection(self.semantic_encoder.token_dim, q.semantic_dim)
        self.teacher: SemanticTower | None = None
        if with_teacher:
            self.teacher = copy.deepcopy(self.semantic_encoder).requires_grad_(False).eval()
        self.pixel_encoder = PixelEncoder(cfg.pixel_codec)
        self.quant_conv = nn.Conv2d(cfg.pixel_codec.z_channels, q.pixel_dim, 1)
        self.quantizer = SharedMappingQuantizer(q)
        self.post_quant_conv = nn.Conv2d(q.pixel_dim, cfg.pixel_codec.z_channels, 1)
        self.pixel_decoder = PixelDecoder(cfg.pixel_codec)
        self.semantic_decoder = SemanticDecoder(
            cfg.semantic_decoder, q.semantic_dim, cfg.grid_size, self.semantic_encoder.target_dim
        )
        self.usage = CodebookUsage(q.codebook_size, q.usage_window)

    def train(self, mode: bool = True) -> "TokenFlowTokenizer":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @property
    def num_tokens(self) -> int:
        return self.cfg.quantizer.num_tokens

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"expected images [B, 3, {size}, {size}] in [0, 1], got {tuple(images.shape)}")

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> the raw concatenated latent [B, Ds+Dp, g, g].

        Not normalised, as in the reference: only the quantizer's per-scale lookup normalises
        (the downsampled residual and the codebooks), so the codes of successive scales can sum
        towards the latent and the residual shrinks scale by scale."""
        self._check_images(images)
        g = self.cfg.grid_size
        sem = self.semantic_proj(self.semantic_encoder.tokens(images))
        sem = sem.transpose(1, 2).reshape(images.shape[0], -1, g, g)
        pix_in = resize(images * 2.0 - 1.0, self.cfg.pixel_size, "bicubic")
        pix = self.quant_conv(self.pixel_encoder(pix_in))
        return torch.cat([sem, pix], dim=1)

    def sample_drop_scale(self, generator: torch.Generator | None = None) -> int | None:
        """Training-time scale drop: with probability p, one random non-first scale index."""
        n = len(self.cfg.quantizer.scales)
        if n < 2 or float(torch.rand((), generator=generator)) >= self.cfg.quantizer.scale_drop_prob:
            return None
        return int(torch.randint(1, n, (), generator=generator))

    def decode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Accumulated code features [B, Ds+Dp, g, g] -> reconstruction in [-1, 1] (unclamped)."""
        pix = features[:, self.cfg.quantizer.semantic_dim :]
        out = self.pixel_decoder(self.post_quant_conv(pix))
        return resize(out, self.cfg.image_size, "bicubic")

    def forward(self, images: torch.Tensor, drop_scale: int | None = None) -> TokenizerOutput:
        """Full training pass: quantize, decode both branches, and compute the teacher target."""
        q = self.quantizer(self.latent(images), drop_scale=drop_scale)
        sem_codes = q.features[:, : self.cfg.quantizer.semantic_dim]
        target = None
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher.target(images)
        self.usage.update(self.flat_tokens(q))
        return TokenizerOutput(
            reconstruction=self.decode_features(q.features),
            semantic_prediction=self.semantic_decoder(sem_codes),
            semantic_target=target,
            indices=q.indices,
            vq_loss=q.vq_loss,
            commit_loss=q.commit_loss,
            profile=q.profile,
        )

    @torch.no_grad()
    def quantize(self, images: torch.Tensor) -> QuantizerOutput:
        """Images [B,3,H,W] in [0,1] -> the quantizer's pass over all scales (no scale dropped)."""
        return self.quantizer(self.latent(images))

    @staticmethod
    def flat_tokens(q: QuantizerOutput) -> torch.Tensor:
        """A pass's indices as [B, sum s^2] over the scales used, scale-major, row-major."""
        return torch.cat(list(q.indices.values()), dim=1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [0,1] -> token indices [B, sum s^2], scale-major, row-major."""
        return self.flat_tokens(self.quantize(images))

    def indices_to_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, sum s^2] -> understanding input [B, g*g, Ds+Dp] (semantic first, then pixel)."""
        return self.quantizer.tokens_to_features(tokens).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def decode_indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [B, sum s^2] -> images [B, 3, H, W] in [0, 1]."""
        recon = self.decode_features(self.quantizer.tokens_to_features(tokens))
        return ((recon + 1.0) / 2.0).clamp(0.0, 1.0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything the generator optimizer updates (the frozen teacher excluded)."""
        return [p for p in self.parameters() if p.requires_grad]
