"""README command 1's path: the whole smoke pipeline through `ray start --head` + `ray job submit`,
under the CI profile (configs/pipelines/ci.yaml: smoke.yaml with a smaller corpus and fewer steps)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

DASHBOARD = "http://127.0.0.1:8265"
STAGES = ("corpus", "train_tokenizer", "eval_reconstruction", "pretokenize", "train_generator",
          "train_understanding", "eval_generation", "eval_understanding")
PROMISED = {
    "train_tokenizer": ("loss/total", "codebook/usage", "heldout/psnr", "latent_norm/pixel",
                        "residual/pixel/scale_0_1", "residual/semantic/scale_5_8"),
    "eval_reconstruction": ("psnr", "baseline/psnr", "residual/pixel/scale_5_8", "latent_norm/semantic"),
    "eval_generation": ("overall", "baseline/overall", "reference/overall"),
    "train_generator": ("loss/image_tokens", "heldout/loss", "heldout/unigram_entropy"),
    "train_understanding": ("align/loss/answer", "loss/answer", "heldout/yes_no_accuracy", "heldout/majority_rate"),
    "corpus": ("stage_seconds",),
    "pretokenize": ("stage_seconds",),
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               DS_ACCELERATOR="cpu", PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    return env


@pytest.fixture(scope="module")
def ray_head():
    subprocess.run(["ray", "start", "--head", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
                    "--disable-usage-stats"], env=_env(), check=True, capture_output=True)
    yield
    subprocess.run(["ray", "stop", "--force"], env=_env(), capture_output=True)


def _submit(storage: Path, *args: str) -> subprocess.CompletedProcess:
    runtime_env = json.dumps({"env_vars": {"TOKENFLOW_GIT_COMMIT": "e2e-test", "DS_ACCELERATOR": "cpu"}})
    cmd = ["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", str(REPO), "--runtime-env-json",
           runtime_env, "--", "python", "pipelines/full.py", "--config", "configs/pipelines/ci.yaml",
           "--storage", str(storage), *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)


@pytest.mark.timeout(2700)
def test_smoke_pipeline_runs_end_to_end_then_is_cached(ray_head, tmp_path):
    import mlflow

    storage = tmp_path / "storage"
    first = _submit(storage)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for stage in STAGES:
        manifests = list(storage.glob(f"{stage}/*/_MANIFEST.json"))
        assert len(manifests) == 1, stage

    client = mlflow.MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tokenflow")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tokenflow.stage") == "pipeline"]
    assert parent.info.status == "FINISHED"
    children = {r.data.tags["tokenflow.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens the runs table
    for experiment_ in client.search_experiments():
        assert str(storage.resolve()) in experiment_.artifact_location, experiment_.name  # no temporary directory
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["tokenflow.git_commit"] == "e2e-test"
        (out_dir,) = Path(storage / stage).glob("*")
        manifest = json.loads((out_dir / "_MANIFEST.json").read_text())
        assert run.data.tags["tokenflow.stage_hash"][:12] == out_dir.name, stage
        assert run.info.run_name == f"ci/{stage}@{run.data.tags['tokenflow.stage_hash'][:8]}"
        # one config hash: params, tag, manifest; the params are the config the stage depends on
        assert run.data.params["config_hash"] == run.data.tags["tokenflow.config_hash"] == manifest["config_hash"]
        assert len(run.data.params) > 3, stage
        assert run.data.tags["mlflow.source.name"] == "pipelines/full.py" and run.data.tags["mlflow.user"]
        assert str(out_dir) in run.data.tags["mlflow.note.content"], stage
        for name in manifest["inputs"]:
            if name in STAGES:
                upstream = json.loads(next(Path(storage / name).glob("*/_MANIFEST.json")).read_text())
                assert run.data.tags[f"tokenflow.upstream.{name}.run_id"] == upstream["mlflow_run_id"]
        contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
        assert contexts <= ({"evaluation"} if stage.startswith("eval_") else {"training"}), stage
        for metric in PROMISED.get(stage, ()):
            assert client.get_metric_history(run.info.run_id, metric), (stage, metric)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"stage_config.json", "output"} <= artifacts, stage
    assert "overall:" in children["eval_generation"].data.tags["mlflow.note.content"]
    for stage in ("train_tokenizer", "train_generator"):  # system metrics per node, step images
        assert "system/node-0/cpu_utilization_percentage" in children[stage].data.metrics, stage
        assert any(a.path.endswith(".png") for a in client.list_artifacts(children[stage].info.run_id, "images"))
    for stage in ("eval_reconstruction", "eval_generation", "eval_understanding"):
        artifacts = {a.path for a in client.list_artifacts(children[stage].info.run_id)}
        assert "results_table.json" in artifacts, stage
    datasets = {d.dataset.name for d in children["eval_generation"].inputs.dataset_inputs}
    assert "geneval_prompts" in datasets
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "plan.json", "resolved_config.yaml", "overrides.txt", "packages.txt"}
    assert parent.data.tags["tokenflow.cached"] == "false"
    assert any(k.startswith("eval_generation/") for k in parent.data.metrics)
    assert any(k.startswith("eval_understanding/") for k in parent.data.metrics)
    assert any(k.startswith("eval_reconstruction/") for k in parent.data.metrics)

    started = time.monotonic()
    second = _submit(storage)
    assert second.returncode == 0, second.stderr[-4000:]
    assert time.monotonic() - started < 60
    assert second.stdout.count(" cached ") == len(STAGES)
    (again,) = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("tokenflow.stage") == "pipeline" and r.info.run_id != parent.info.run_id]
    assert again.info.run_name == "ci pipeline (cached)" and again.data.tags["tokenflow.cached"] == "true"
    assert "Nothing ran" in again.data.tags["mlflow.note.content"]
    assert {again.data.tags[f"tokenflow.reused.{stage}.run_id"] for stage in STAGES} == {
        r.info.run_id for r in children.values()}

    dry = _submit(storage, "--dry-run", "--set", "train_generator.steps=601")
    rerun = sorted(line.split()[0] for line in dry.stdout.splitlines() if " run " in line or " pending " in line)
    assert rerun == ["eval_generation", "train_generator"]
