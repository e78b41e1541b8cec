"""What every Ray Train worker shares: joining the worker group, metric reduction, MLflow
logging from rank 0, checkpoint report/restore through Ray Train, and ZeRO-3-safe weight
gathering. The loop itself is :mod:`tokenflow.train.loop`."""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from tokenflow.monitoring import system_metrics
from tokenflow.train.checkpoint import load_checkpoint, save_checkpoint
from tokenflow.train.jobs import WorkerJob

log = logging.getLogger(__name__)


def join_worker_group(use_gpu: bool) -> tuple[int, int, torch.device]:
    """This Ray Train worker's (rank, world size, device), with torch.distributed joined."""
    import ray.train

    from tokenflow.train.engines import init_distributed, worker_device

    ctx = ray.train.get_context()
    device = worker_device(use_gpu)
    init_distributed(device)
    return ctx.get_world_rank(), ctx.get_world_size(), device


def all_reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """The mean of each value over all ranks (collective)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size for k, v in zip(keys, t)}


class Tracker:
    """Rank 0's MLflow logging into the stage's run (a no-op on other ranks), and each node's
    system metrics."""

    def __init__(self, job: WorkerJob, rank: int):
        self.job = job
        self.active = rank == 0 and job.mlflow_run_id is not None
        if self.active:
            import mlflow

            self.client = mlflow.MlflowClient(job.tracking_uri)
            self.run_id = job.mlflow_run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.active:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in sorted(values.items())])

    def artifact(self, path: Path, artifact_dir: str) -> None:
        if self.active:
            self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def image(self, key: str, path: Path, step: int) -> None:
        """An image of ``step`` under ``key``: the MLflow UI shows it with a step slider."""
        if self.active:
            from PIL import Image

            with Image.open(path) as image:
                self.client.log_image(self.run_id, image.convert("RGB"), key=key, step=step)

    @contextmanager
    def node_metrics(self) -> Iterator[None]:
        """While inside: this node's CPU, memory, disk, network (and GPU) as ``system/<node>/...``
        metrics of the stage's run, sampled by the node's first worker (local rank 0)."""
        import ray.train

        interval = self.job.config.tracking.system_metrics_every_s
        if not interval or self.job.mlflow_run_id is None or ray.train.get_context().get_local_rank() != 0:
            yield
            return
        with system_metrics(self.job.mlflow_run_id, self.job.tracking_uri, interval,
                            f"node-{ray.train.get_context().get_node_rank()}"):
            yield


def restore(engines: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """The client state of Ray Train's latest checkpoint (engines and RNG restored), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory), engines, rank, world_size)
    log.info("rank %d resumed at step %d", rank, state["step"])
    return state


def report_checkpoint(engines: dict[str, Any], rank: int, world_size: int, state: dict[str, Any],
                      metrics: dict[str, float] | None = None) -> None:
    """Save every engine and this rank's ``state`` (with ``step``) and report it (collective)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), engines, rank, world_size, state)
        ray.train.report({"step": state["step"], **(metrics or {})},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{state['step']:07d}")


def gathered_state_dict(module: nn.Module, engine: Any, rank: int, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``module``'s parameters and buffers on rank 0 (empty elsewhere),
    gathering ZeRO-3 partitions one submodule at a time so peak memory stays one layer."""
    import deepspeed

    zero3 = engine.zero_optimization_stage() == 3
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        params = [p for p in sub.parameters(recurse=False)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3 and bool(params)):
            if rank == 0:
                buffers = [(n, b) for n, b in sub.named_buffers(recurse=False)
                           if n not in sub._non_persistent_buffers_set]  # as state_dict() does
                tensors = [*sub.named_parameters(recurse=False), *buffers]
                for name, tensor in tensors:
                    full = f"{prefix}.{name}" if prefix else name
                    if not full.startswith(skip):
                        out[full] = tensor.detach().to("cpu", copy=True).contiguous()
    return out
