"""LPIPS-style perceptual distance on a VGG16 backbone, weights from configured files.

Nothing is downloaded: the VGG16 state dict (torchvision layout) and the LPIPS linear-layer
weights (the layout the ``lpips`` package ships: ``lin{i}.model.1.weight``) are read from the
paths in :class:`~tokenflow.config.PerceptualConfig`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow.config import PerceptualConfig

_TAPS = (3, 8, 15, 22, 29)  # vgg16.features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a .safetensors or torch state dict (tensors only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class PerceptualLoss(nn.Module):
    """Mean LPIPS distance between two image batches in [-1, 1]; frozen."""

    def __init__(self, cfg: PerceptualConfig):
        super().__init__()
        from torchvision.models import vgg16

        if not (cfg.backbone_weights and cfg.linear_weights):
            raise ValueError("perceptual loss needs backbone_weights and linear_weights")
        vgg = vgg16(weights=None)
        vgg.load_state_dict(load_state_dict_file(cfg.backbone_weights, "perceptual.backbone_weights"))
        self.features = vgg.features[: _TAPS[-1] + 1]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS)
        linear = load_state_dict_file(cfg.linear_weights, "perceptual.linear_weights")
        found = {int(m.group(1)): v for k, v in linear.items() if (m := re.match(r"lin(\d)\..*weight$", k))}
        if sorted(found) != list(range(len(_CHANNELS))):
            raise ValueError(
                f"perceptual.linear_weights: expected keys lin0..lin4 (*.weight), got {sorted(linear)}"
            )
        for i, lin in enumerate(self.lins):
            lin.weight.data.copy_(found[i].view_as(lin.weight))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = a.new_zeros(())
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            diff = (F.normalize(fa, dim=1, eps=1e-10) - F.normalize(fb, dim=1, eps=1e-10)) ** 2
            total = total + lin(diff).mean()
        return total
