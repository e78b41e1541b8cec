"""System metrics (CPU, memory, disk, network; GPU where NVML is present) into an MLflow run."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def system_metrics(run_id: str, tracking_uri: str | None, interval: float, node: str) -> Iterator[None]:
    """While inside: MLflow's system-metrics monitor samples this machine every ``interval``
    seconds into ``run_id`` as ``system/<node>/<metric>`` (continuing the steps of a resumed run)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, node_id=node,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
