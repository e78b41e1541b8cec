"""Evaluation stages as Ray tasks: the stage function runs on a Ray worker holding the CPUs and
the GPU its config declares (``pipeline.resources``), not in the driver, so the scheduler places
it where those are free and the driver stays a coordinator."""

from __future__ import annotations

import os
from typing import Any

from tokenflow.config import TokenFlowConfig
from tokenflow.stages.stage_run import RunLink
from tokenflow.workflow.durable import StageOutput
from tokenflow.workflow.pipeline import Runner

# Re-runs of a task whose worker or node died (never of one that raised: a failed evaluation
# fails its stage, and the next pipeline run starts it again).
SYSTEM_RETRIES = 2


def run_as_task(name: str, run: Runner, cfg: TokenFlowConfig, inputs: dict[str, StageOutput], out_url: str,
                link: RunLink, need: dict[str, float]) -> dict[str, Any]:
    """``run(cfg, inputs, out_url, link)`` in a Ray task holding ``need`` (CPU, GPU); its
    manifest, or the stage's exception (an instance of the original type)."""
    import ray

    task = ray.remote(_run_stage).options(num_cpus=need.get("CPU", 1.0), num_gpus=need.get("GPU", 0.0),
                                          max_retries=SYSTEM_RETRIES, retry_exceptions=False,
                                          name=f"tokenflow.{name}")
    return ray.get(task.remote(run, cfg, inputs, out_url, link, os.environ.get("MLFLOW_TRACKING_URI")))


def _run_stage(run: Runner, cfg: TokenFlowConfig, inputs: dict[str, StageOutput], out_url: str, link: RunLink,
               tracking_uri: str | None) -> dict[str, Any]:
    from tokenflow.logs import configure_logging

    configure_logging()
    if tracking_uri:  # the driver's store (a worker does not inherit the driver's environment)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    return run(cfg, inputs, out_url, link)
