"""Reconstruction benchmark: PSNR, SSIM, rFID and codebook usage of a tokenizer round trip.

Every image goes through ``tokenizer.encode`` (all scales) and ``tokenizer.decode_indices``, at
the tokenizer's own resolution (the caller feeds images already preprocessed to
``cfg.image_size``). PSNR and SSIM (:mod:`tokenflow.eval.image_metrics`) are per image and
averaged over images. rFID is the Fréchet distance between the Inception features of the
originals and of the reconstructions, both at the tokenizer's resolution (the extractor then
resizes each to 299 px, :mod:`tokenflow.eval.fid`); like any FID it is biased upward for small
sample counts, so only compare values computed on the same number of images (50k on ImageNet
val in the literature). Codebook usage and perplexity count every token of every scale over the
whole evaluation set (:func:`tokenflow.models.codebook_usage.usage_and_perplexity`). The
quantizer's residual profile (:class:`tokenflow.models.quantizer.ResidualProfile`: ||r|| / ||h||
after each scale, per half, and the latent's norm) is summed over the set as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from tokenflow.eval.fid import fid_from_features
from tokenflow.eval.image_metrics import psnr, ssim
from tokenflow.models.codebook_usage import usage_and_perplexity
from tokenflow.models.quantizer import ResidualProfile
from tokenflow.models.tokenizer import TokenFlowTokenizer

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
"""Images ``[B, 3, H, W]`` in [0, 1] -> features ``[B, D]`` (e.g. an InceptionFeatureExtractor)."""


@dataclass(frozen=True)
class SampleScore:
    """One image's reconstruction scores."""

    key: str
    psnr: float
    ssim: float


@dataclass(frozen=True)
class ReconstructionReport:
    """Aggregate metrics over the evaluation set and the per-image table."""

    psnr: float
    ssim: float
    rfid: float | None  # None when no feature extractor was given
    codebook_usage: float
    codebook_perplexity: float
    residuals: dict[str, float]  # ResidualProfile.metrics over the whole set
    samples: tuple[SampleScore, ...]

    def metrics(self) -> dict[str, float]:
        """Flat name -> value mapping for tracking (``rfid`` only when computed)."""
        out = {"psnr": self.psnr, "ssim": self.ssim, "codebook/usage": self.codebook_usage,
               "codebook/perplexity": self.codebook_perplexity, "num_images": float(len(self.samples)),
               **self.residuals}
        if self.rfid is not None:
            out["rfid"] = self.rfid
        return out


def evaluate_reconstruction(tokenizer: TokenFlowTokenizer,
                            batches: Iterable[tuple[Sequence[str], torch.Tensor]],
                            fid_extractor: FeatureExtractor | None = None) -> ReconstructionReport:
    """Score the tokenizer's round trip over ``(keys, images [B, 3, S, S] in [0, 1])`` batches.

    Images are moved to the tokenizer's device (the extractor must accept them there). The
    tokenizer runs in eval mode and is put back in its previous mode afterwards.
    """
    device = next(tokenizer.parameters()).device
    counts = torch.zeros(tokenizer.cfg.quantizer.codebook_size, dtype=torch.long)
    samples: list[SampleScore] = []
    real_features: list[np.ndarray] = []
    fake_features: list[np.ndarray] = []
    profile: ResidualProfile | None = None
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with torch.no_grad():
            for keys, images in batches:
                if len(keys) != images.shape[0]:
                    raise ValueError(f"{len(keys)} keys for a batch of {images.shape[0]} images")
                images = images.to(device)
                q = tokenizer.quantize(images)
                profile = q.profile if profile is None else profile.add(q.profile)
                tokens = tokenizer.flat_tokens(q)
                recon = tokenizer.decode_indices(tokens)
                counts += torch.bincount(tokens.reshape(-1).cpu(), minlength=counts.numel())
                samples.extend(SampleScore(str(k), float(p), float(s))
                               for k, p, s in zip(keys, psnr(recon, images), ssim(recon, images)))
                if fid_extractor is not None:
                    real_features.append(fid_extractor(images).double().cpu().numpy())
                    fake_features.append(fid_extractor(recon).double().cpu().numpy())
    finally:
        tokenizer.train(was_training)
    if not samples:
        raise ValueError("no images to evaluate")
    usage, perplexity = usage_and_perplexity(counts)
    rfid = None
    if fid_extractor is not None:
        rfid = fid_from_features(np.concatenate(real_features), np.concatenate(fake_features))
    return ReconstructionReport(
        psnr=float(np.mean([s.psnr for s in samples])), ssim=float(np.mean([s.ssim for s in samples])),
        rfid=rfid, codebook_usage=usage, codebook_perplexity=perplexity,
        residuals=profile.metrics(), samples=tuple(samples))
