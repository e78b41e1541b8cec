"""The one training loop every Ray Train worker runs: micro-batches and optimizer steps, metric
logging, held-out evaluation, checkpoints, exact resume and progress.

A worker builds a :class:`TrainingTask` (its engines, batches and step function) and hands it to
:func:`run_loop` with a :class:`Schedule`; the loop owns the rhythm.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from tokenflow.config import TrainingConfig
from tokenflow.train.harness import Tracker, all_reduce_mean, report_checkpoint, restore, worker_nodes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """When the loop steps, logs, evaluates and checkpoints (in optimizer steps)."""

    steps: int
    micro_batch_size: int
    grad_accum: int
    log_every: int
    checkpoint_every: int
    eval_every: int | None = None  # None: no held-out evaluation
    prefix: str = ""  # metric name prefix (e.g. "align/" for a first phase)
    on_corrupt_checkpoint: str = "fallback"  # TrainingConfig.corrupt_checkpoint

    @classmethod
    def of(cls, t: TrainingConfig, eval_every: int | None, steps: int | None = None, prefix: str = "") -> "Schedule":
        """A stage's schedule from its training config (``steps`` overrides ``t.steps``)."""
        return cls(steps or t.steps, t.micro_batch_size, t.grad_accum, t.log_every, t.checkpoint_every, eval_every,
                   prefix, t.corrupt_checkpoint)

    def due(self, step: int, every: int | None) -> bool:
        return every is not None and (step % every == 0 or step == self.steps)


class TrainingTask(Protocol):
    """What a worker supplies to :func:`run_loop`."""

    engines: dict[str, Any]  # DeepSpeed engines, checkpointed; the first one's lr is logged
    rates: dict[str, float]  # extra throughput metrics: name -> units per sample (may be empty)

    def micro_step(self, step: int, micro: int) -> dict[str, float]:
        """Forward, backward and engine step on one micro-batch; its named losses."""

    def log_values(self) -> dict[str, float]:
        """Values logged with every log step besides the losses (collective on every rank)."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics (collective on every rank)."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's resumable state besides the engines (data position, counters)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def resharded(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's state, for :meth:`load_state_dict`, from the states of the ranks of another
        world size (in rank order): the rest of their epoch re-sharded, counters kept once."""


@dataclass
class Progress:
    """Rank 0's progress line: steps done, loss, throughput and time left."""

    name: str
    steps: int
    active: bool

    def report(self, step: int, values: dict[str, float], seconds_per_step: float) -> None:
        if not self.active:
            return
        losses = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()) if "loss" in k and "/scale_" not in k)
        left = (self.steps - step) * seconds_per_step
        log.info("%s: step %d/%d (%.0f%%) %s | %.1f samples/s | %s left", self.name, step, self.steps,
                 100.0 * step / self.steps, losses, values.get("samples_per_s", 0.0), _duration(left))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def run_loop(task: TrainingTask, schedule: Schedule, tracker: Tracker, rank: int, world: int, name: str) -> None:
    """Train ``task`` to ``schedule.steps``, resuming from the newest checkpoint that verifies
    when there is one (recorded as the ``resumed_from_step`` and ``resumed_from_world_size``
    metrics), also one saved by another number of workers; each node's system metrics go to the
    stage's run meanwhile."""
    step = 0
    tracker.tag("tokenflow.worker_nodes", json.dumps(worker_nodes(world)))  # this attempt's placement
    restored = restore(task.engines, rank, world, schedule.on_corrupt_checkpoint)
    if restored is not None:
        step, saved_world = restored.step, restored.saved_world_size
        tasks = [state["task"] for state in restored.states]
        task.load_state_dict(tasks[rank] if saved_world == world else task.resharded(tasks, rank, world))
        # Every resume (a restarted worker group, a re-submitted stage, another world size) is one
        # point of these metrics.
        tracker.metrics({schedule.prefix + "resumed_from_step": float(step),
                         schedule.prefix + "resumed_from_world_size": float(saved_world)}, step)
        if restored.skipped:
            tracker.tag("tokenflow.checkpoints_skipped", "; ".join(restored.skipped))
    with tracker.node_metrics():
        _steps(task, schedule, tracker, rank, world, step, Progress(name, schedule.steps, rank == 0))


def _steps(task: TrainingTask, schedule: Schedule, tracker: Tracker, rank: int, world: int, step: int,
           progress: Progress) -> None:
    samples_per_step = schedule.micro_batch_size * schedule.grad_accum * world
    start = step
    lr_engine = next(iter(task.engines.values()))
    window_start, window_steps = time.perf_counter(), 0
    while step < schedule.steps:
        sums: dict[str, float] = {}
        for micro in range(schedule.grad_accum):
            for key, value in task.micro_step(step, micro).items():
                sums[key] = sums.get(key, 0.0) + value / schedule.grad_accum
        step += 1
        window_steps += 1

        if schedule.due(step, schedule.log_every):
            seconds_per_step = (time.perf_counter() - window_start) / window_steps
            rate = samples_per_step / max(seconds_per_step, 1e-9)
            values = {**all_reduce_mean(sums, world), **task.log_values(),
                      "lr": lr_engine.optimizer.param_groups[0]["lr"], "samples_per_s": rate,
                      **{key: rate * units for key, units in task.rates.items()}}
            if schedule.due(step, schedule.eval_every):
                values.update(task.evaluate(step))
            values = {schedule.prefix + k: v for k, v in values.items()}
            tracker.metrics(values, step)
            progress.report(step, {k.removeprefix(schedule.prefix): v for k, v in values.items()}, seconds_per_step)
            window_start, window_steps = time.perf_counter(), 0

        if schedule.due(step, schedule.checkpoint_every):
            report_checkpoint(task.engines, rank, world, {"step": step, "task": task.state_dict()}, start)
