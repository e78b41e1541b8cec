"""Launching a DeepSpeed-in-Ray-Train stage: resources, backend, run directory, resume."""

from __future__ import annotations

import logging
from typing import Any, Callable

from tokenflow import storage
from tokenflow.config import TrainingConfig
from tokenflow.train.jobs import WorkerJob

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # Ray Train's run directories, under the stage output


def resolve_use_gpu(setting: bool | str) -> bool:
    """``auto``: GPUs when the connected Ray cluster has any."""
    import ray

    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(setting)


def _run_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry: the stage's worker function on its typed job."""
    config["worker"](config["job"])


def fit(worker: Callable[[Any], None], job: WorkerJob, t: TrainingConfig, out_url: str, run_name: str) -> None:
    """Run ``worker(job)`` on ``t.num_workers`` Ray Train workers (a fixed number or an elastic range). Checkpoints live under
    ``<out_url>/checkpoints/<run_name>`` (any fsspec URL); calling this again with the same
    arguments resumes from the latest."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = job.use_gpu
    checkpoint_fs, checkpoint_path = storage.pyarrow_filesystem(storage.join(out_url, CHECKPOINTS_DIR))
    trainer = TorchTrainer(
        _run_worker,
        train_loop_config={"worker": worker, "job": job},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker},
                                     placement_strategy=t.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=checkpoint_path, storage_filesystem=checkpoint_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             # A preempted node counts like a failure (Ray's default retries those forever).
                             failure_config=FailureConfig(max_failures=t.max_failures,
                                                          max_preemption_failures=t.max_failures)),
    )
    log.info("%s: %s %s workers (%s), %d steps (ZeRO config %s), up to %d restarts", run_name,
             "{}-{}".format(*t.worker_range) if isinstance(t.num_workers, tuple) else t.num_workers,
             "GPU" if use_gpu else "CPU", t.placement_strategy, t.steps, t.deepspeed, t.max_failures)
    trainer.fit()
