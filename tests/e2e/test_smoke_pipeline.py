"""README command 1's path on a cluster's services: the whole smoke pipeline through `ray start
--head` + `ray job submit`, under the CI profile (configs/pipelines/ci.yaml: smoke.yaml with a
smaller corpus and fewer steps), with every output on a real S3 server (SeaweedFS) and tracking
on an MLflow server with basic auth, a PostgreSQL backend store and proxied S3 artifacts. The
credentials reach Ray only through the environment `ray start` runs in, as on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tokenflow import storage
from tokenflow.config import load_config

from tests.conftest import REPO, forget_s3_clients

DASHBOARD = "http://127.0.0.1:8265"
STAGES = ("corpus.shapes", "train_tokenizer", "eval_reconstruction", "pretokenize.shapes", "train_generator",
          "train_understanding", "eval_generation", "eval_dpg", "eval_understanding", "eval_pope")
PROMISED = {
    "train_tokenizer": ("loss/total", "codebook/usage", "heldout/psnr", "latent_norm/pixel",
                        "residual/pixel/scale_0_1", "residual/semantic/scale_5_8"),
    "eval_reconstruction": ("psnr", "baseline/psnr", "residual/pixel/scale_5_8", "latent_norm/semantic"),
    "eval_generation": ("overall", "baseline/overall", "reference/overall"),
    "eval_pope": ("f1", "baseline/f1", "random/f1", "adversarial/yes_ratio", "baseline/popular/accuracy"),
    "eval_dpg": ("overall", "baseline/overall", "reference/overall", "entity", "baseline/attribute/color"),
    "train_generator": ("loss/image_tokens", "heldout/loss", "heldout/unigram_entropy", "data/shapes/examples",
                        "data/shapes/share", "data/shapes/weight"),
    "train_understanding": ("align/loss/answer", "loss/answer", "heldout/yes_no_accuracy", "heldout/majority_rate",
                            "align/data/shapes/examples", "data/shapes/examples"),
    "corpus.shapes": ("stage_seconds", "train/samples"),
    "pretokenize.shapes": ("stage_seconds",),
}


def _env(stack=None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_")) and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               DS_ACCELERATOR="cpu", PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    return {**env, **(stack.client_env if stack else {})}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tokenflow.services.stack import LocalStack

    with LocalStack(tmp_path_factory.mktemp("services")).running() as running:
        yield running
    forget_s3_clients()


@pytest.fixture(scope="module")
def ray_head(stack, tmp_path_factory):
    """A Ray head whose processes (the job's driver, every worker) carry the stack's variables;
    ``ray start``'s own output is kept for the secrets check."""
    started = subprocess.run(["ray", "start", "--head", "--num-cpus", "2", "--dashboard-host", "127.0.0.1",
                              "--disable-usage-stats"], env=_env(stack), check=True, capture_output=True, text=True)
    yield started.stdout + started.stderr
    subprocess.run(["ray", "stop", "--force"], env=_env(), capture_output=True)


def _submit(storage_url: str, *args: str) -> subprocess.CompletedProcess:
    runtime_env = json.dumps({"env_vars": {"TOKENFLOW_GIT_COMMIT": "e2e-test", "DS_ACCELERATOR": "cpu"}})
    cmd = ["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", str(REPO), "--runtime-env-json",
           runtime_env, "--", "python", "pipelines/full.py", "--config", "configs/pipelines/ci.yaml",
           "--storage", storage_url, *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)


def _manifest(url: str) -> dict:
    return storage.read_json(storage.join(url, "_MANIFEST.json"))


@pytest.mark.timeout(2700)
def test_smoke_pipeline_on_object_storage_and_a_tracking_server_then_cached(stack, ray_head, monkeypatch):
    import mlflow

    for key, value in stack.client_env.items():  # this process reads the bucket and the server too
        monkeypatch.setenv(key, value)
    root = f"{stack.bucket_url}/e2e-{uuid.uuid4().hex[:8]}"
    first = _submit(root)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    outputs = {}
    for stage in STAGES:
        fs, path = storage.filesystem(storage.join(root, stage))
        (out,) = fs.ls(path)  # one output per stage
        outputs[stage] = f"s3://{out}"
        assert storage.exists(storage.join(outputs[stage], "_MANIFEST.json")), stage

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tokenflow")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("tokenflow.stage") == "pipeline"]
    assert parent.info.status == "FINISHED"
    children = {r.data.tags["tokenflow.stage"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens the runs table
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied: no bucket keys in clients
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["tokenflow.git_commit"] == "e2e-test"
        out_dir = outputs[stage]
        manifest = _manifest(out_dir)
        assert run.data.tags["tokenflow.stage_hash"][:12] == storage.basename(out_dir), stage
        assert manifest["files"] and not any(f.startswith("checkpoints/") for f in manifest["files"])
        assert run.info.run_name == f"ci/{stage}@{run.data.tags['tokenflow.stage_hash'][:8]}"
        # one config hash: params, tag, manifest; the params are the config the stage depends on
        assert run.data.params["config_hash"] == run.data.tags["tokenflow.config_hash"] == manifest["config_hash"]
        assert len(run.data.params) > 3, stage
        assert run.data.tags["mlflow.source.name"] == "pipelines/full.py" and run.data.tags["mlflow.user"]
        assert out_dir in run.data.tags["mlflow.note.content"], stage
        for name in manifest["inputs"]:
            if name in STAGES:
                upstream = _manifest(outputs[name])
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
    for stage in ("eval_reconstruction", "eval_generation", "eval_dpg", "eval_understanding", "eval_pope"):
        artifacts = {a.path for a in client.list_artifacts(children[stage].info.run_id)}
        assert "results_table.json" in artifacts, stage
    datasets = {d.dataset.name for d in children["eval_generation"].inputs.dataset_inputs}
    assert "geneval_prompts" in datasets
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "plan.json", "resolved_config.yaml", "overrides.txt", "packages.txt"}
    assert parent.data.tags["tokenflow.cached"] == "false"
    assert any(k.startswith("eval_reconstruction/") for k in parent.data.metrics)
    for headline in ("eval_generation/overall", "eval_dpg/overall", "eval_understanding/perception", "eval_pope/f1"):
        # shapes-GenEval, shapes-DPG, shapes-MME and shapes-POPE side by side with their untrained baselines
        stage, metric = headline.split("/", 1)
        assert {headline, f"{stage}/baseline/{metric}"} <= set(parent.data.metrics), headline

    # Lineage: each training stage's manifest lists its corpus, digest, weight and the samples it drew.
    ci = load_config(REPO / "configs" / "pipelines" / "ci.yaml")
    for stage, phase in (("train_tokenizer", "train"), ("train_generator", "train"), ("train_understanding", "finetune")):
        t = getattr(ci, stage)
        (row,) = _manifest(outputs[stage])["data"][phase]
        assert row["corpus"] == "shapes" and row["weight"] == 1.0 and row["realised_share"] == 1.0, stage
        assert row["examples"] == t.steps * t.micro_batch_size * t.grad_accum * t.num_workers, (stage, row)
        assert row["digest"] and row["duplicates_dropped"] == 0, stage
    _check_registered_models(client, outputs)
    verify = subprocess.run([sys.executable, "-m", "tokenflow.cli", "shards", "verify", outputs["pretokenize.shapes"]],
                            cwd=REPO, env=_env(stack), capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    started = time.monotonic()
    second = _submit(root)
    assert second.returncode == 0, second.stderr[-4000:]
    assert time.monotonic() - started < 60
    assert second.stdout.count(" cached ") == len(STAGES)
    (again,) = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.tags.get("tokenflow.stage") == "pipeline" and r.info.run_id != parent.info.run_id]
    assert again.info.run_name == "ci pipeline (cached)" and again.data.tags["tokenflow.cached"] == "true"
    assert "Nothing ran" in again.data.tags["mlflow.note.content"]
    assert {again.data.tags[f"tokenflow.reused.{stage}.run_id"] for stage in STAGES} == {
        r.info.run_id for r in children.values()}

    dry = _submit(root, "--dry-run", "--set", "train_generator.steps=601")
    rerun = sorted(line.split()[0] for line in dry.stdout.splitlines() if " run " in line or " pending " in line)
    assert rerun == ["eval_dpg", "eval_generation", "train_generator"]

    refused = subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"],
                             env={**_env(), "MLFLOW_TRACKING_URI": stack.mlflow.uri}, capture_output=True, text=True)
    assert refused.returncode != 0 and "401" in refused.stderr  # the server refuses a client without credentials

    secrets = [stack.store.secret_key, stack.mlflow.admin_password, stack.postgres.password]
    logged = [first.stdout, first.stderr, second.stdout, second.stderr, dry.stdout, dry.stderr, ray_head,
              verify.stdout, verify.stderr, *_ray_logs(), *_tracked_text(client, experiment.experiment_id)]
    for secret in secrets:
        assert not [text for text in logged if secret in text][:1], "a secret reached the logs or MLflow"


def _check_registered_models(client, outputs: dict[str, str]) -> None:
    """Every model stage's export is a registered version carrying its lineage, under the
    ``candidate`` alias, and loads back through the project's loaders."""
    from tokenflow.stages.registry import load_registered

    for stage, name in (("train_tokenizer", "tokenflow-tokenizer"), ("train_generator", "tokenflow-t2i-generator"),
                        ("train_understanding", "tokenflow-understanding")):
        version = client.get_model_version_by_alias(name, "candidate")
        manifest = _manifest(outputs[stage])
        assert version.run_id == manifest["mlflow_run_id"] and version.source.startswith(outputs[stage]), stage
        assert version.tags["tokenflow.stage_hash"][:12] == storage.basename(outputs[stage])
        assert version.tags["tokenflow.config_hash"] == manifest["config_hash"]
        assert json.loads(version.tags["tokenflow.input_digests"]) == manifest["inputs"]
        assert version.tags["tokenflow.git_commit"] == "e2e-test"
    assert load_registered("tokenflow-tokenizer").quantizer is not None
    generator, text_tokenizer = load_registered("tokenflow-t2i-generator", "candidate")
    assert generator.scales and text_tokenizer.vocab_size > 0


def _ray_logs() -> list[str]:
    return [p.read_text(errors="replace") for p in Path("/tmp/ray/session_latest/logs").rglob("*") if p.is_file()]


def _tracked_text(client, experiment_id: str) -> list[str]:
    """Every param and tag of every run and registered version, and every text artifact of the runs."""
    import mlflow

    texts = []
    for run in client.search_runs([experiment_id]):
        texts.append(json.dumps([run.data.params, run.data.tags]))
        local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id)
        texts += [p.read_text(errors="replace") for p in Path(local).rglob("*")
                  if p.is_file() and p.suffix in (".json", ".txt", ".yaml", ".jsonl")]
    for model in client.search_registered_models():
        texts += [json.dumps(v.tags) for v in client.search_model_versions(f"name = '{model.name}'")]
    return texts
