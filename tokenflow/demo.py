"""Tokenize procedurally drawn sample images and report what the tokenizer produces."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tokenflow.config import TokenizerConfig
from tokenflow.data.decode import preprocess
from tokenflow.data.shapes import generate_scene, render_scene
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.viz import save_image_grid

log = logging.getLogger(__name__)


def run_demo(cfg: TokenizerConfig, out_dir: Path, seed: int = 0, num_images: int = 4) -> dict[str, int]:
    """Encode ``num_images`` shapes scenes, decode them back, print per-scale token counts and
    write ``out_dir/demo_grid.png`` (originals above reconstructions). Returns the counts."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = TokenFlowTokenizer(cfg, with_teacher=False).eval()
    images = torch.stack([preprocess(render_scene(generate_scene(rng, 64), 64), cfg.image_size)
                          for _ in range(num_images)])
    tokens = model.encode(images)
    counts = {f"scale {s}x{s}": s * s for s in cfg.quantizer.scales}
    print(f"{cfg.name}: {num_images} images of {cfg.image_size}px -> tokens {tuple(tokens.shape)}")
    for name, n in counts.items():
        print(f"  {name:>12}: {n:5d} tokens")
    print(f"  {'total':>12}: {tokens.shape[1]:5d} tokens per image, codebook {cfg.quantizer.codebook_size}, "
          f"{len(torch.unique(tokens))} distinct codes used")
    recon = model.decode_indices(tokens)
    grid = save_image_grid(Path(out_dir) / "demo_grid.png", [images, recon],
                           ["original", "reconstruction (untrained weights)"], scale=2)
    print(f"  image grid: {grid}")
    return {**counts, "total": int(tokens.shape[1])}
