"""The ``eval_reconstruction`` stage: PSNR, SSIM, rFID and codebook usage of the tokenizer's
round trip on the held-out images, against an untrained tokenizer (see eval_common)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import torch

from tokenflow.config import SampleLimitsConfig, TokenFlowConfig
from tokenflow.data.decode import DecodeError, decode_image, preprocess
from tokenflow.data.manifest import content_digest
from tokenflow.eval.reconstruction import evaluate_reconstruction
from tokenflow.eval.runners import untrained_tokenizer
from tokenflow.stages.eval_common import (RESULTS_NAME, finish_evaluation, heldout_samples,
                                          load_tokenizer_export, log_grid, resolve_device, with_baseline,
                                          write_results)
from tokenflow.stages.stage_run import RunLink, StageRun

log = logging.getLogger(__name__)

GRID_IMAGES = 8

RECONSTRUCTION_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("error", pa.string()),
                                   ("psnr", pa.float64()), ("ssim", pa.float64()),
                                   ("baseline_psnr", pa.float64()), ("baseline_ssim", pa.float64())])


def _heldout_batches(corpus_manifest: dict[str, Any], size: int, batch_size: int, max_images: int | None,
                     seen: list[dict[str, Any]],
                     limits: SampleLimitsConfig) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Batches of decoded held-out images preprocessed to ``size``; every sample read is
    appended to ``seen`` as ``{key, shard, error}`` (error: why it could not be used, else None)."""
    keys: list[str] = []
    images: list[torch.Tensor] = []
    used = 0
    for shard, sample in heldout_samples(corpus_manifest):
        if max_images is not None and used >= max_images:
            break
        error = sample.problem
        if error is None:
            try:
                images.append(preprocess(decode_image(sample.image or b"", limits), size))
            except DecodeError as exc:
                error = exc.reason
        seen.append({"key": sample.key, "shard": shard, "error": error})
        if error is not None:
            continue
        keys.append(sample.key)
        used += 1
        if len(keys) == batch_size:
            yield keys, torch.stack(images)
            keys, images = [], []
    if keys:
        yield keys, torch.stack(images)


def run_eval_reconstruction(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], tokenizer_url: str,
                            out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """PSNR, SSIM, rFID (when Inception weights are configured) and codebook usage of the
    tokenizer's round trip on the held-out images; returns the stage manifest."""
    from tokenflow.eval.fid import InceptionFeatureExtractor

    r = cfg.eval.reconstruction
    device = resolve_device(cfg.eval.device)
    tokenizer, tokenizer_digest = load_tokenizer_export(tokenizer_url, device)
    baseline = untrained_tokenizer(tokenizer.cfg, cfg.eval.seed).to(device)
    size = tokenizer.cfg.image_size
    inputs = {"corpus_manifest": content_digest(corpus_manifest), "tokenizer": tokenizer_digest}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp, StageRun(
            cfg, "eval_reconstruction", {"eval"}, out_url, inputs, link,
            "Reconstruction of the held-out images through the tokenizer (PSNR, SSIM, rFID, codebook "
            "usage, residual profile), against an untrained tokenizer.") as run:
        scratch = Path(tmp)
        extractor = None
        if r.fid.inception_weights:
            extractor = InceptionFeatureExtractor(r.fid.inception_weights, r.fid.architecture).to(device)
        else:
            skipped["rfid"] = "eval.reconstruction.fid.inception_weights is not set"
            log.info("rFID skipped: %s", skipped["rfid"])
            run.tag("tokenflow.skipped.rfid", skipped["rfid"])
        seen: list[dict[str, Any]] = []
        report = evaluate_reconstruction(
            tokenizer, _heldout_batches(corpus_manifest, size, r.batch_size, r.max_images, seen, cfg.limits), extractor)
        base = evaluate_reconstruction(
            baseline, _heldout_batches(corpus_manifest, size, r.batch_size, r.max_images, [], cfg.limits), extractor)
        undecodable = [s for s in seen if s["error"] is not None]
        if undecodable:
            log.warning("%d held-out samples could not be decoded (listed in %s)", len(undecodable), RESULTS_NAME)
        scores = iter(zip(report.samples, base.samples))  # the decoded samples, in order
        rows = []
        for s in seen:
            row = dict(s)
            if s["error"] is None:
                trained, untrained = next(scores)
                row.update(psnr=trained.psnr, ssim=trained.ssim, baseline_psnr=untrained.psnr,
                           baseline_ssim=untrained.ssim)
            rows.append(row)
        write_results(run, scratch, rows, RECONSTRUCTION_SCHEMA)

        _, first = next(_heldout_batches(corpus_manifest, size, GRID_IMAGES, None, [], cfg.limits))
        first = first.to(device)
        log_grid(run, scratch, "reconstructions.png",
                 [first, tokenizer.decode_indices(tokenizer.encode(first)),
                  baseline.decode_indices(baseline.encode(first))],
                 ["original", "reconstruction", "untrained tokenizer"])
        metrics = with_baseline({**report.metrics(), "undecodable_images": float(len(undecodable))}, base.metrics())
        return finish_evaluation(run, metrics, "psnr", skipped=skipped)
