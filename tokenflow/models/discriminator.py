"""PatchGAN discriminator and hinge losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow.config import DiscriminatorConfig


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN (pix2pix style) on images in [-1, 1]: one logit per patch."""

    def __init__(self, cfg: DiscriminatorConfig, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, cfg.ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < cfg.n_layers else 1
            layers += [
                nn.Conv2d(cfg.ndf * prev, cfg.ndf * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cfg.ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(cfg.ndf * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss."""
    return -logits_fake.mean()
