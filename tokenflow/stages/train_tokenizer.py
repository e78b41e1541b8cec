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
from tokenflow.config import TokenFlowConfig, config_hash
from tokenflow.data.manifest import file_digest, manifest_digest, shard_records
from tokenflow.data.token_shards import MANIFEST_NAME
from tokenflow.workflow.tracking import (ensure_experiment, flatten_params, git_commit,
                                         resolve_tracking_uri)

log = logging.getLogger(__name__)

STAGE = "train_tokenizer"
TRAIN_RUN_NAME = "train"


def _use_gpu(setting: bool | str) -> bool:
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def find_or_create_run(experiment_id: str, stage: str, out_url: str, params: dict[str, str],
                       tags: dict[str, str], parent_run_id: str | None) -> str:
    """The unfinished MLflow run for this stage output (a resumed job), or a new one."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.`tokenflow.stage` = '{stage}' and "
                                             f"tags.`tokenflow.output` = '{out_url}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id
    all_tags = {"tokenflow.stage": stage, "tokenflow.output": out_url, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=stage, tags=all_tags)
    for start in range(0, len(params), 100):
        chunk = dict(sorted(params.items())[start : start + 100])
        mlflow.MlflowClient().log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v)
                                                                  for k, v in chunk.items()])
    return run.info.run_id


def run_train_tokenizer(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], out_url: str,
                        parent_run_id: str | None = None) -> dict[str, Any]:
    """Train (or resume training) the tokenizer; returns the stage manifest."""
    import mlflow
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from tokenflow.train.tokenizer_worker import train_tokenizer_worker

    t = cfg.train_tokenizer
    use_gpu = _use_gpu(t.use_gpu)
    tracking_uri = resolve_tracking_uri(cfg.tracking, out_url)
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(cfg.tracking.experiment, out_url)
    corpus_digest = manifest_digest(corpus_manifest)
    params = {**flatten_params(cfg.model_dump(mode="json", include={"tokenizer", "train_tokenizer"})),
              "config_hash": config_hash(cfg.model_dump(mode="json", include={"tokenizer", "train_tokenizer"})),
              "git_commit": git_commit(), "corpus_manifest_digest": corpus_digest}
    run_id = find_or_create_run(experiment_id, STAGE, out_url, params,
                                {"tokenflow.git_commit": params["git_commit"],
                                 "tokenflow.corpus_manifest": corpus_digest}, parent_run_id)
    job = {
        "config": cfg.model_dump(mode="json"),
        "train_shards": [r.__dict__ for r in shard_records(corpus_manifest, "train")],
        "heldout_shards": [r.__dict__ for r in shard_records(corpus_manifest, "heldout")],
        "use_gpu": use_gpu,
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "export_url": storage.join(out_url, "tokenizer.safetensors"),
        "quarantine_url": storage.join(out_url, "quarantine.json"),
    }
    trainer = TorchTrainer(
        train_tokenizer_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=TRAIN_RUN_NAME, storage_path=out_url,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    log.info("training the tokenizer on %d %s workers for %d steps (MLflow run %s)",
             t.num_workers, "GPU" if use_gpu else "CPU", t.steps, run_id)
    trainer.fit()
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
