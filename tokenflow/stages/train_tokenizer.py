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
from tokenflow.data.dedup import Duplicates, find_duplicates
from tokenflow.data.manifest import ShardRecord, content_digest, file_digest, sample_digests, shard_records
from tokenflow.data.stage_data import StageData
from tokenflow.models.weights import file_sha256
from tokenflow.stages.lineage import drawn, log_mixture
from tokenflow.stages.stage_run import RunLink, StageRun
from tokenflow.stages.training import fit, resolve_use_gpu
from tokenflow.train.jobs import TokenizerJob
from tokenflow.train.mixture import MixtureSource, without_emptied

TRAIN_RUN_NAME = "train"
_DESCRIPTIONS = {
    "train_tokenizer": "Trains the TokenFlow tokenizer (shared-mapping dual codebook, multi-scale residual "
                       "quantizer, semantic and pixel decoders) with DeepSpeed on Ray Train workers.",
    "finetune_decoder": "Fine-tunes only the pixel decoder of the trained tokenizer (everything else frozen, "
                        "token ids unchanged), the reference's second phase.",
}
EXPORT_NAME = "tokenizer.safetensors"


def run_train_tokenizer(cfg: TokenFlowConfig, data: list[StageData], out_url: str,
                        link: RunLink | None = None) -> dict[str, Any]:
    """Train (or resume training) the tokenizer on the mixture of corpora ``data``; returns the
    stage manifest."""
    return _run_tokenizer_stage(cfg, "train_tokenizer", {"tokenizer", "train_tokenizer"}, data, out_url,
                                link, {}, None)


def run_finetune_decoder(cfg: TokenFlowConfig, data: list[StageData], tokenizer_url: str,
                         tokenizer_sha256: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """Fine-tune only the pixel decoder of the tokenizer export at ``tokenizer_url`` (the
    reference's second phase); its export decodes the same tokens. Returns the stage manifest."""
    if cfg.finetune_decoder is None:
        raise ConfigError("the config has no finetune_decoder section")
    found = file_sha256(storage.local_path(tokenizer_url))
    if found != tokenizer_sha256:
        raise ValueError(f"{tokenizer_url} has sha256 {found[:12]}, its stage recorded {tokenizer_sha256[:12]}")
    return _run_tokenizer_stage(cfg, "finetune_decoder", {"tokenizer", "finetune_decoder"}, data,
                                out_url, link, {"tokenizer": tokenizer_sha256}, tokenizer_url)


def _mixture(data: list[StageData], workers: int,
             dedup_images: bool = True) -> tuple[list[MixtureSource[ShardRecord]], Duplicates]:
    """Each corpus's training shards as a mixture source, images repeated from an earlier corpus
    dropped unless ``dedup_images`` is off (by the per-sample digests the corpus stage wrote)."""
    shards = {d.corpus: shard_records(d.manifest, "train") for d in data}
    by_url = {r.url: (d, r) for d in data for r in shards[d.corpus]}
    dedup = Duplicates() if not dedup_images else find_duplicates(
        [(d.corpus, [r.url for r in shards[d.corpus]]) for d in data],
        lambda url: sample_digests(by_url[url][0].url, "train", by_url[url][1]))
    return [without_emptied(MixtureSource(d.corpus, d.weight, shards[d.corpus], dedup.dropped.get(d.corpus, {})),
                            lambda r: r.samples, workers) for d in data], dedup


def _run_tokenizer_stage(cfg: TokenFlowConfig, section: str, logged: set[str], data: list[StageData],
                         out_url: str, link: RunLink | None, inputs: dict[str, str],
                         init_url: str | None) -> dict[str, Any]:
    from tokenflow.train.tokenizer_worker import train_tokenizer_worker

    t = getattr(cfg, section)
    inputs = {**{f"corpus.{d.corpus}": content_digest(d.manifest) for d in data}, **inputs}
    with StageRun(cfg, section, logged, out_url, inputs, link, _DESCRIPTIONS[section]) as run:
        train, dedup = _mixture(data, t.worker_range[1], t.dedup == "images")
        table = log_mixture(run, data, dedup)
        job = TokenizerJob(
            config=cfg, use_gpu=resolve_use_gpu(t.use_gpu), tracking_uri=run.tracking_uri,
            mlflow_run_id=run.run_id, section=section, train=train,
            heldout=[MixtureSource(d.corpus, d.weight, shard_records(d.manifest, "heldout")) for d in data],
            export_url=storage.join(out_url, EXPORT_NAME), quarantine_url=storage.join(out_url, "quarantine.json"),
            init_url=init_url)
        fit(train_tokenizer_worker, job, t, out_url, TRAIN_RUN_NAME)
        size, sha = file_digest(job.export_url)
        run.tag("tokenflow.tokenizer_sha256", sha)
        run.register_model(job.export_url, "", sha)
        return run.finish({"kind": "tokenizer", "tokenizer": {"path": EXPORT_NAME, "bytes": size, "sha256": sha},
                           "quarantine": "quarantine.json", "steps": t.steps, "data": {"train": drawn(run, table)}})
