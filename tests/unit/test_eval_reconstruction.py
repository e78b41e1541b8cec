"""Reconstruction benchmark on the tiny tokenizer (random init) and rendered shapes images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenflow.data.shapes import generate_scene, render_scene
from tokenflow.eval.fid import fid_from_features
from tokenflow.eval.image_metrics import psnr, ssim
from tokenflow.eval.reconstruction import evaluate_reconstruction
from tokenflow.models.codebook_usage import usage_and_perplexity
from tokenflow.models.tokenizer import TokenFlowTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_config):
    torch.manual_seed(0)
    return TokenFlowTokenizer(tiny_config, with_teacher=False)


@pytest.fixture(scope="module")
def images(tiny_config) -> torch.Tensor:
    rng = np.random.default_rng(0)
    size = tiny_config.image_size
    arrays = [np.asarray(render_scene(generate_scene(rng, size), size)) for _ in range(6)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _mean_color(x: torch.Tensor) -> torch.Tensor:
    """A stand-in feature extractor: per-channel means (3-d features)."""
    return x.mean(dim=(2, 3))


def test_metrics_match_an_independent_round_trip(tokenizer, images):
    keys = [f"img-{i}" for i in range(len(images))]
    batches = [(keys[:4], images[:4]), (keys[4:], images[4:])]
    report = evaluate_reconstruction(tokenizer, batches, fid_extractor=_mean_color)

    with torch.no_grad():
        tokens = tokenizer.encode(images)
        recon = tokenizer.decode_indices(tokens)
    assert [s.key for s in report.samples] == keys
    np.testing.assert_allclose([s.psnr for s in report.samples], psnr(recon, images).numpy(), rtol=1e-6)
    np.testing.assert_allclose([s.ssim for s in report.samples], ssim(recon, images).numpy(), rtol=1e-6)
    assert report.psnr == pytest.approx(float(psnr(recon, images).mean()), rel=1e-6)
    assert report.ssim == pytest.approx(float(ssim(recon, images).mean()), rel=1e-6)
    counts = torch.bincount(tokens.reshape(-1), minlength=tokenizer.cfg.quantizer.codebook_size)
    assert (report.codebook_usage, report.codebook_perplexity) == pytest.approx(usage_and_perplexity(counts))
    assert report.rfid == pytest.approx(fid_from_features(_mean_color(images), _mean_color(recon)), rel=1e-6)
    # The residual profile summed over both batches equals one pass over all images.
    profile = tokenizer.quantize(images).profile.metrics()
    assert report.residuals == pytest.approx(profile, rel=1e-5)
    assert set(report.metrics()) == {"psnr", "ssim", "rfid", "codebook/usage", "codebook/perplexity",
                                     "num_images", *profile}
    assert {"latent_norm/pixel", "residual/pixel/scale_0_1", "residual/semantic/scale_5_8"} <= set(profile)


def test_without_extractor_rfid_is_none_and_training_mode_is_restored(tokenizer, images):
    tokenizer.train()
    report = evaluate_reconstruction(tokenizer, [(["a", "b"], images[:2])])
    assert report.rfid is None and "rfid" not in report.metrics()
    assert tokenizer.training
    tokenizer.eval()


def test_bad_batches_raise(tokenizer, images):
    with pytest.raises(ValueError, match="keys"):
        evaluate_reconstruction(tokenizer, [(["only-one"], images[:2])])
    with pytest.raises(ValueError, match="no images"):
        evaluate_reconstruction(tokenizer, [])


def test_geneval_reference_scores_each_prompt_on_its_reconstruction_and_bad_sources_as_zero(tokenizer, tiny_config):
    from tokenflow.data.shapes import encode_png
    from tokenflow.eval.geneval import GenEvalPrompt, GenEvalRules, Include
    from tokenflow.eval.geneval_backends import ShapesColorClassifier, ShapesObjectDetector
    from tokenflow.eval.runners import score_reconstructions

    scene = generate_scene(np.random.default_rng(1), tiny_config.image_size)
    png = encode_png(render_scene(scene, tiny_config.image_size))
    prompt = GenEvalPrompt("single_object", "a thing", (Include(scene.objects[0].shape, 1),))
    results = score_reconstructions(tokenizer, [png, b"not an image", png], [prompt] * 3, ShapesObjectDetector(),
                                    ShapesColorClassifier(), GenEvalRules(), batch_size=1)
    assert [r.prompt for r in results] == ["a thing"] * 3
    assert not results[1].correct and results[1].reason == "source image: undecodable"
    assert results[0] == results[2]  # batching does not change a prompt's verdict
