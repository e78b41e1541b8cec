"""The tokenizer training stage: Ray Train ``TorchTrainer`` workers running DeepSpeed engines.

Outputs under ``out_url``: Ray Train's run directory ``train/`` (checkpoints), the inference
export ``tokenizer.safetensors``, ``quarantine.json`` (samples that could not be decoded) and
``_MANIFEST.json`` (written last). Starting the stage again with the same ``out_url`` resumes
from the latest checkpoint (Ray Train restores a run by its storage path and name) and keeps
logging into the same MLflow run.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.data.manifest import file_digest, manifest_digest, shard_records
from tokenflow.data.token_shards import MANIFEST_NAME
from tokenflow.stages.training import fit, resolve_use_gpu
from tokenflow.workflow.tracking import start_stage_run

log = logging.getLogger(__name__)

STAGE = "train_tokenizer"
TRAIN_RUN_NAME = "train"


def run_train_tokenizer(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], out_url: str,
                        parent_run_id: str | None = None) -> dict[str, Any]:
    """Train (or resume training) the tokenizer; returns the stage manifest."""
    import mlflow

    from tokenflow.train.tokenizer_worker import train_tokenizer_worker

    t = cfg.train_tokenizer
    corpus_digest = manifest_digest(corpus_manifest)
    tracking_uri, run_id, params = start_stage_run(cfg, STAGE, {"tokenizer", "train_tokenizer"}, out_url,
                                                   {"corpus_manifest": corpus_digest}, parent_run_id)
    job = {
        "config": cfg.model_dump(mode="json"),
        "train_shards": [r.__dict__ for r in shard_records(corpus_manifest, "train")],
        "heldout_shards": [r.__dict__ for r in shard_records(corpus_manifest, "heldout")],
        "use_gpu": resolve_use_gpu(t.use_gpu),
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "export_url": storage.join(out_url, "tokenizer.safetensors"),
        "quarantine_url": storage.join(out_url, "quarantine.json"),
    }
    fit(train_tokenizer_worker, job, t, out_url, TRAIN_RUN_NAME)
    size, sha = file_digest(job["export_url"])
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "tokenflow.tokenizer_sha256", sha)
    manifest = {
        "kind": "tokenizer",
        "tokenizer": {"path": "tokenizer.safetensors", "bytes": size, "sha256": sha},
        "quarantine": "quarantine.json",
        "steps": t.steps,
        "config_hash": params["config_hash"],
        "inputs": {"corpus_manifest": corpus_digest},
        "mlflow_run_id": run_id,
    }
    storage.write_json_atomic(storage.join(out_url, MANIFEST_NAME), manifest)
    client.set_terminated(run_id, "FINISHED")
    return manifest
