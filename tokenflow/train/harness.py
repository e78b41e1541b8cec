"""What every Ray Train worker shares: joining the worker group, metric reduction, MLflow
logging from rank 0, checkpoint report/restore through Ray Train, and ZeRO-3-safe weight
gathering. The loop itself is :mod:`tokenflow.train.loop`."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pyarrow_fs
import torch
import torch.distributed as dist
from torch import nn

from tokenflow.monitoring import system_metrics
from tokenflow.train.checkpoint import (CheckpointError, load_checkpoint, load_resized, save_checkpoint,
                                       saved_world_size, to_universal, verify_checkpoint)
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


def worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank, in rank order (collective)."""
    import ray

    nodes: list[Any] = [None] * world_size
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def _collective_device() -> torch.device:
    """Where a tensor for a collective must live: NCCL reduces CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    """The mean of each value over all ranks (collective)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return {k: float(v) / world_size for k, v in zip(keys, t.cpu())}


def mixture_values(counts: dict[str, int], world_size: int) -> dict[str, float]:
    """Samples drawn per corpus by all workers together (``data/<corpus>/examples``) and each
    corpus's realised share (``data/<corpus>/share``), from this worker's ``counts`` (collective)."""
    totals = {c: n * world_size for c, n in all_reduce_mean({c: float(n) for c, n in counts.items()}, world_size).items()}
    drawn = sum(totals.values())
    return {**{f"data/{c}/examples": round(n) for c, n in totals.items()},
            **{f"data/{c}/share": n / drawn if drawn else 0.0 for c, n in totals.items()}}


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

    def tag(self, key: str, value: str) -> None:
        if self.active:
            self.client.set_tag(self.run_id, key, value)

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


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` resumed from."""

    states: list[dict[str, Any]]  # the client state of each rank that saved the checkpoint
    checkpoint: str  # the checkpoint directory's name
    skipped: tuple[str, ...]  # "<name>: <reason>" of each newer checkpoint that did not verify

    @property
    def step(self) -> int:
        return int(self.states[0]["step"])

    @property
    def saved_world_size(self) -> int:
        return len(self.states)


def _any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (collective)."""
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _newest_first(latest: Any) -> Iterator[Any]:
    """Ray Train's latest checkpoint, then the older ones beside it in storage, newest first."""
    from ray.train import Checkpoint

    yield latest
    parent, name = latest.path.rstrip("/").rsplit("/", 1)
    listing = latest.filesystem.get_file_info(pyarrow_fs.FileSelector(parent))
    older = sorted((info.base_name for info in listing
                    if info.type == pyarrow_fs.FileType.Directory and info.base_name.startswith("checkpoint_")
                    and info.base_name < name), reverse=True)
    for base in older:
        yield Checkpoint(f"{parent}/{base}", latest.filesystem)


def restore(engines: dict[str, Any], rank: int, world_size: int, on_corrupt: str = "fallback") -> Restored | None:
    """Restore engines and RNG from the newest checkpoint that verifies on every rank, or None
    when there is none yet. A latest checkpoint that does not verify is skipped with a warning
    (``on_corrupt="fallback"``) or raises (``"fail"``); none verifying raises
    :class:`CheckpointError` (collective: every rank resumes from the same checkpoint)."""
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    skipped: list[str] = []
    for checkpoint in _newest_first(latest):
        name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        with checkpoint.as_directory() as directory:
            problem = verify_checkpoint(Path(directory), rank, world_size)
            if not _any_rank(problem is not None):
                states = _load(Path(directory), checkpoint.path, engines, rank, world_size)
                log.info("rank %d resumed at step %d from %s (saved by %d workers)", rank, states[0]["step"],
                         name, len(states))
                return Restored(states, name, tuple(skipped))
        reason = problem or "a file of another rank does not verify"
        if on_corrupt == "fail":
            raise CheckpointError(f"checkpoint {name} does not verify: {reason} (corrupt_checkpoint: fail)")
        log.warning("checkpoint %s does not verify (%s); trying the one before it", name, reason)
        skipped.append(f"{name}: {reason}")
    raise CheckpointError("no checkpoint verifies, refusing to start from scratch: " + "; ".join(skipped))


def _load(directory: Path, stored_at: str, engines: dict[str, Any], rank: int,
          world_size: int) -> list[dict[str, Any]]:
    """Every saving rank's client state, with this rank's engines and RNG restored (collective).
    Saved by another number of workers, the first worker of each node converts the engines'
    checkpoints (``directory``, downloaded from ``stored_at``) to DeepSpeed's universal form in
    a node-local directory named after ``stored_at``, which every worker of the node then loads
    its new partition from."""
    import ray.train

    saved = saved_world_size(directory)
    if saved == world_size:
        own = load_checkpoint(directory, engines, rank, world_size)
        return [json.loads((directory / f"rank{r}.json").read_text()) if r != rank else own
                for r in range(world_size)]
    log.warning("checkpoint %s was saved by %s workers, resuming with %d: converting it to a DeepSpeed "
                "universal checkpoint and re-sharding the data stream", stored_at, saved, world_size)
    # Named after where the checkpoint is stored, the same on every rank (each rank's download
    # directory is its own).
    universal = Path(tempfile.gettempdir()) / "tokenflow-universal" / hashlib.sha256(
        stored_at.encode()).hexdigest()[:16]
    converter = ray.train.get_context().get_local_rank() == 0
    failure = None
    if converter:
        shutil.rmtree(universal, ignore_errors=True)
        try:
            for name in engines:
                to_universal(directory, name, universal)
        except CheckpointError as exc:
            failure = exc
    if _any_rank(failure is not None):  # also the barrier before anyone loads
        raise failure or CheckpointError(f"{stored_at}: conversion to a universal checkpoint failed on another node")
    # A rank that fails to load raises here: Ray Train ends the group (no collective on that path).
    states = load_resized(directory, universal, engines, rank)
    _any_rank(False)  # every rank of the node has loaded before the directory goes
    if converter:
        shutil.rmtree(universal, ignore_errors=True)
    return states


def checkpoint_name(step: int, resumed_from: int, world_size: int) -> str:
    """A checkpoint directory's name: its step, the step its attempt started from and the
    attempt's world size, so an attempt that fell back behind a bad checkpoint, or runs on
    another number of workers, never writes into another attempt's directory (names sort by
    step, then by attempt)."""
    return f"checkpoint_{step:07d}_from_{resumed_from:07d}_w{world_size}"


def report_checkpoint(engines: dict[str, Any], rank: int, world_size: int, state: dict[str, Any],
                      resumed_from: int) -> None:
    """Save every engine and this rank's ``state`` (with ``step``) and report it (collective)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), engines, rank, world_size, state)
        ray.train.report({"step": state["step"]}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(state["step"], resumed_from, world_size))


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
