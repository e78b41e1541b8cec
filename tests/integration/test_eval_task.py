"""Evaluation stages run as Ray tasks holding their declared resources, not in the driver."""

from __future__ import annotations

import os

import pytest

from tokenflow.config import load_config
from tokenflow.stages.stage_run import RunLink
from tokenflow.workflow.eval_task import run_as_task

from tests.conftest import MODEL_CONFIGS


def _where(cfg, inputs, out_url, link):
    """A stand-in stage: where it ran and what it was given."""
    import ray

    return {"pid": os.getpid(), "tracking": os.environ.get("MLFLOW_TRACKING_URI"), "out": out_url,
            "inputs": sorted(inputs), "link": link.parent_run_id, "seed": cfg.eval.seed,
            "cpus": ray.get_runtime_context().get_assigned_resources().get("CPU")}


def _fails(cfg, inputs, out_url, link):
    raise ValueError("the benchmark files are unreadable")


def test_an_evaluation_runs_in_a_ray_task_with_its_resources_and_tracking_store(ray_local, monkeypatch):
    cfg = load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", ["eval.seed=7"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/somewhere/mlflow.db")
    link = RunLink(parent_run_id="parent", pipeline="t")
    got = run_as_task("eval_generation", _where, cfg, {"corpus": None}, "file:///out", link, {"CPU": 1.0, "GPU": 0.0})
    assert got["pid"] != os.getpid() and got["cpus"] == 1.0
    assert got == {**got, "tracking": "sqlite:////tmp/somewhere/mlflow.db", "out": "file:///out",
                   "inputs": ["corpus"], "link": "parent", "seed": 7}
    with pytest.raises(ValueError, match="unreadable"):  # the stage's own exception type reaches the runner
        run_as_task("eval_generation", _fails, cfg, {}, "file:///out", link, {"CPU": 1.0})
