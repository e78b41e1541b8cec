"""The one stage-run context: params, tags, description, manifest, failure and resume."""

from __future__ import annotations

import json

import mlflow
import pytest

from tokenflow.config import config_hash, load_config
from tokenflow.stages.stage_run import RunLink, StageIdentity, StageRun
from tokenflow.stages.tracking import ensure_experiment, resolve_tracking_uri

from tests.conftest import REPO

SMOKE = REPO / "configs" / "pipelines" / "smoke.yaml"


@pytest.fixture
def cfg(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(SMOKE)


def _identity() -> StageIdentity:
    return StageIdentity(hash="ab" * 32, config={"eval.seed": 0}, inputs={"corpus": "cd" * 32}, code="ef" * 32,
                         modules=("tokenflow.stages.corpus",), deepspeed=None, libraries={"torch": "2"}, device="cpu")


def test_a_new_store_keeps_every_experiment_under_storage_and_opens_on_runs(cfg, tmp_path):
    uri = resolve_tracking_uri(cfg.tracking, str(tmp_path))
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment("tokenflow", str(tmp_path))
    client = mlflow.MlflowClient(uri)
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    locations = {e.name: e.artifact_location for e in client.search_experiments()}
    assert set(locations) == {"Default", "tokenflow"}
    assert all(loc.startswith((tmp_path / "mlartifacts").resolve().as_uri()) for loc in locations.values())


def test_a_linked_stage_run_records_its_identity_and_finishes_with_its_manifest(cfg, tmp_path):
    link = RunLink("parent-id-not-checked", _identity(), {}, "smoke")
    with StageRun(cfg, "eval_reconstruction", {"eval"}, str(tmp_path), {"corpus": "cd" * 32}, link,
                  "What it does.") as run:
        manifest = run.finish({"kind": "eval_reconstruction", "metrics": {"psnr": 20.0}}, "psnr: 20")
    client = mlflow.MlflowClient(run.tracking_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "smoke/eval_reconstruction@abababab"
    assert got.data.params["eval.seed"] == "0" and "eval.device" not in got.data.params  # the identity's config
    assert got.data.params["config_hash"] == got.data.tags["tokenflow.config_hash"] == manifest["config_hash"] == \
        config_hash({"eval.seed": 0})
    assert got.data.tags["tokenflow.stage_hash"] == "ab" * 32 and got.data.tags["mlflow.user"]
    note = got.data.tags["mlflow.note.content"]
    assert note.startswith("What it does.") and "psnr: 20" in note and str(tmp_path) in note
    assert json.loads((tmp_path / "_MANIFEST.json").read_text()) == manifest
    assert manifest["mlflow_run_id"] == run.run_id and manifest["inputs"] == {"corpus": "cd" * 32}
    assert {a.path for a in client.list_artifacts(run.run_id)} >= {"stage_config.json", "stage_identity.json",
                                                                  "output"}
    assert "stage_seconds" in got.data.metrics


def test_a_failing_stage_closes_its_run_failed_and_a_resume_reopens_it(cfg, tmp_path):
    with pytest.raises(RuntimeError):
        with StageRun(cfg, "corpus", {"corpus"}, str(tmp_path), {}) as run:
            raise RuntimeError("worker lost")
    client = mlflow.MlflowClient(run.tracking_uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert not (tmp_path / "_MANIFEST.json").exists()
    with StageRun(cfg, "corpus", {"corpus"}, str(tmp_path), {}) as again:
        assert again.run_id == run.run_id and client.get_run(run.run_id).info.status == "RUNNING"
        again.finish({"kind": "corpus"})
    assert client.get_run(run.run_id).info.status == "FINISHED"


def test_an_evaluation_samples_system_metrics_of_its_process(monkeypatch, tmp_path):
    import time

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE, ["tracking.system_metrics_every_s=0.5"])
    with StageRun(cfg, "eval_understanding", {"eval"}, str(tmp_path), {}) as run:
        time.sleep(1.5)
        run.finish({"kind": "eval_understanding"})
    metrics = mlflow.MlflowClient(run.tracking_uri).get_run(run.run_id).data.metrics
    assert "system/eval/cpu_utilization_percentage" in metrics and "system/eval/system_memory_usage_megabytes" in metrics
