"""MLflow tracking: where runs go, how a run is found again on resume, and flat params from
configs. Every stage opens its run through :mod:`tokenflow.stages.stage_run`; the workflow its parent run."""

from __future__ import annotations

import getpass
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tokenflow import storage
from tokenflow.config import TrackingConfig
from tokenflow.redaction import redact, redact_config

_REPO = Path(__file__).resolve().parents[2]
_MAX_PARAM_VALUE = 6000


def is_server(uri: str) -> bool:
    """True for a tracking server's URI (as opposed to a database or file store)."""
    return uri.startswith(("http://", "https://"))


def check_tracking(cfg: TrackingConfig, storage_url: str) -> str:
    """The configured URI (else ``MLFLOW_TRACKING_URI``, else ""), after refusing what would fail
    only after training: a tracking server registers no exports on a local disk it cannot see,
    and remote storage needs a server."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    local = storage.is_local(storage_url)
    if is_server(uri) and local and cfg.registered_models:
        raise ValueError(f"storage {redact(storage_url)} is local but tracking goes to the server {redact(uri)}, "
                         "which cannot register exports on this disk: put --storage on object storage, or set "
                         "tracking.registered_models={} to register nothing")
    if not uri and not local:
        raise ValueError(f"storage {redact(storage_url)} is not local: set tracking.tracking_uri (or "
                         "MLFLOW_TRACKING_URI) to an MLflow server")
    return uri


def resolve_tracking_uri(cfg: TrackingConfig, storage_url: str) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else a sqlite store under local storage."""
    if uri := check_tracking(cfg, storage_url):
        return uri
    path = Path(storage.filesystem(storage_url)[1]).resolve()
    path.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{path / 'mlflow.db'}"
    if not (path / "mlflow.db").exists():
        # Create the store here so its "Default" experiment keeps artifacts under the storage
        # root too (MLflow would otherwise point it at ./mlruns of whatever directory the first
        # client ran in, e.g. a Ray job's temporary working directory).
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(uri, _artifact_location(str(path)))
    return uri


def _artifact_location(storage_url: str) -> str:
    if storage.is_local(storage_url):
        return Path(storage.filesystem(storage_url)[1]).resolve().joinpath("mlartifacts").as_uri()
    return storage.join(storage_url, "mlartifacts")


# The MLflow UI opens a "custom model development" experiment on its runs table (the other kinds
# open a GenAI traces view); MLflow 3.17's UI reads this experiment tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(name: str, storage_url: str) -> str:
    """The experiment id for ``name``, created (model-training kind) if new; an existing
    experiment gets the kind tag if it lacks it. A tracking server keeps the artifacts where it
    is configured to (proxied: clients need no storage credentials); a database store keeps them
    under the storage root."""
    import mlflow

    from mlflow.exceptions import MlflowException

    found = mlflow.get_experiment_by_name(name)
    if found is None:
        server = is_server(mlflow.get_tracking_uri())
        try:
            return mlflow.create_experiment(name, tags=EXPERIMENT_KIND,
                                            artifact_location=None if server else _artifact_location(storage_url))
        except MlflowException as exc:  # another run created it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = mlflow.get_experiment_by_name(name)
    for key, value in EXPERIMENT_KIND.items():
        if found.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def git_commit() -> str:
    """The checkout's commit (``-dirty`` when tracked files changed), or ``unknown``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("TOKENFLOW_GIT_COMMIT", "unknown")
    return commit + ("-dirty" if dirty else "")


def flatten_params(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` strings that fit MLflow's param limits."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, child in value.items():
            out.update(flatten_params(child, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = str(value)
    return {prefix: text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."}


def log_text_artifact(client: Any, run_id: str, text: str, name: str, directory: str | None = None) -> None:
    """Log ``text`` (redacted) as the artifact file ``[directory/]name`` of a run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(redact(text))
        client.log_artifact(run_id, str(path), directory)


def standard_tags(source: str) -> dict[str, str]:
    """MLflow's own source, git and user tags (what the UI shows in a run's overview)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # a container user without a name
        user = "unknown"
    return {"mlflow.source.name": source, "mlflow.source.type": "JOB", "mlflow.source.git.commit": git_commit(),
            "mlflow.user": user}


def find_or_create_run(experiment_id: str, stage: str, out_url: str, params: dict[str, str],
                       tags: dict[str, str], parent_run_id: str | None, reuse_unfinished: bool = True,
                       run_name: str | None = None) -> str:
    """The unfinished MLflow run for this stage output (a resumed job), or a new one."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    out_url = redact(out_url)
    found = client.search_runs([experiment_id],
                               filter_string=f"tags.`tokenflow.stage` = '{stage}' and "
                                             f"tags.`tokenflow.output` = '{out_url}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if reuse_unfinished and found and found[0].info.status != "FINISHED":
        if found[0].info.status != "RUNNING":  # a failed attempt: the resumed stage runs in it again
            client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    all_tags = {"tokenflow.stage": stage, "tokenflow.output": out_url, **{k: redact(v) for k, v in tags.items()}}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name or stage, tags=all_tags)
    items = sorted(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[start : start + 100]])
    return run.info.run_id


def start_stage_run(cfg: Any, stage: str, config: dict[str, Any], out_url: str, inputs: dict[str, str],
                    parent_run_id: str | None = None, reuse_unfinished: bool = True,
                    run_name: str | None = None, source: str = "pipelines/full.py") -> tuple[str, str, dict[str, str]]:
    """Open (or reopen, on resume) the stage's MLflow run with the ``config`` it depends on, its
    hash, the git commit and its inputs' digests as params, and the standard tags.

    Returns ``(tracking_uri, run_id, params)``.
    """
    import mlflow

    from tokenflow.config import config_hash

    tracking_uri = resolve_tracking_uri(cfg.tracking, out_url)
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(cfg.tracking.experiment, out_url)
    params = {**flatten_params(redact_config(config)), "config_hash": config_hash(config), "git_commit": git_commit(),
              **{f"input.{name}": digest for name, digest in inputs.items()}}
    tags = {**standard_tags(source), "tokenflow.git_commit": params["git_commit"],
            "tokenflow.config_hash": params["config_hash"],
            **{f"tokenflow.input.{name}": digest for name, digest in inputs.items()}}
    run_id = find_or_create_run(experiment_id, stage, out_url, params, tags, parent_run_id, reuse_unfinished,
                                run_name)
    return tracking_uri, run_id, params
