"""The tokenizer training stages: Ray Train ``TorchTrainer`` workers running DeepSpeed engines.

``train_tokenizer`` trains the whole tokenizer; ``finetune_decoder`` (optional) then trains only
the pixel decoder of its export, every other weight frozen, so the tokens are unchanged. Both
write, under ``out_url``: Ray Train's run directory ``train/`` (checkpoints), the inference
export ``tokenizer.safetensors``, ``quarantine.json`` (samples that could not be decoded) and
``_MANIFEST.json`` (written last). Starting the stage again with the same ``out_url`` resumes
from the latest checkpoint (Ray Train restores a run by its storage path and name) and keeps
logging into the same MLflow run.
"""

from __future__ import annotations

from typing import Any

from tokenflow import storage
from tokenflow.config import ConfigError, TokenFlowConfig
from tokenflow.data.manifest import content_digest, file_digest, shard_records
from tokenflow.models.weights import file_sha256
from tokenflow.stages.stage_run import RunLink, StageRun
from tokenflow.stages.training import fit, resolve_use_gpu
from tokenflow.train.jobs import TokenizerJob

TRAIN_RUN_NAME = "train"
_DESCRIPTIONS = {
    "train_tokenizer": "Trains the TokenFlow tokenizer (shared-mapping dual codebook, multi-scale residual "
                       "quantizer, semantic and pixel decoders) with DeepSpeed on Ray Train workers.",
    "finetune_decoder": "Fine-tunes only the pixel decoder of the trained tokenizer (everything else frozen, "
                        "token ids unchanged), the reference's second phase.",
}
EXPORT_NAME = "tokenizer.safetensors"


def run_train_tokenizer(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], out_url: str,
                        link: RunLink | None = None) -> dict[str, Any]:
    """Train (or resume training) the tokenizer; returns the stage manifest."""
    return _run_tokenizer_stage(cfg, "train_tokenizer", {"tokenizer", "train_tokenizer"}, corpus_manifest, out_url,
                                link, {}, None)


def run_finetune_decoder(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], tokenizer_url: str,
                         tokenizer_sha256: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """Fine-tune only the pixel decoder of the tokenizer export at ``tokenizer_url`` (the
    reference's second phase); its export decodes the same tokens. Returns the stage manifest."""
    if cfg.finetune_decoder is None:
        raise ConfigError("the config has no finetune_decoder section")
    found = file_sha256(storage.local_path(tokenizer_url))
    if found != tokenizer_sha256:
        raise ValueError(f"{tokenizer_url} has sha256 {found[:12]}, its stage recorded {tokenizer_sha256[:12]}")
    return _run_tokenizer_stage(cfg, "finetune_decoder", {"tokenizer", "finetune_decoder"}, corpus_manifest,
                                out_url, link, {"tokenizer": tokenizer_sha256}, tokenizer_url)


def _run_tokenizer_stage(cfg: TokenFlowConfig, section: str, logged: set[str], corpus_manifest: dict[str, Any],
                         out_url: str, link: RunLink | None, inputs: dict[str, str],
                         init_url: str | None) -> dict[str, Any]:
    from tokenflow.train.tokenizer_worker import train_tokenizer_worker

    t = getattr(cfg, section)
    inputs = {"corpus_manifest": content_digest(corpus_manifest), **inputs}
    with StageRun(cfg, section, logged, out_url, inputs, link, _DESCRIPTIONS[section]) as run:
        job = TokenizerJob(
            config=cfg, use_gpu=resolve_use_gpu(t.use_gpu), tracking_uri=run.tracking_uri,
            mlflow_run_id=run.run_id, section=section,
            train_shards=shard_records(corpus_manifest, "train"),
            heldout_shards=shard_records(corpus_manifest, "heldout"),
            export_url=storage.join(out_url, EXPORT_NAME), quarantine_url=storage.join(out_url, "quarantine.json"),
            init_url=init_url)
        fit(train_tokenizer_worker, job, t, out_url, TRAIN_RUN_NAME)
        size, sha = file_digest(job.export_url)
        run.tag("tokenflow.tokenizer_sha256", sha)
        run.register_model(job.export_url, "", sha)
        return run.finish({"kind": "tokenizer", "tokenizer": {"path": EXPORT_NAME, "bytes": size, "sha256": sha},
                           "quarantine": "quarantine.json", "steps": t.steps})
