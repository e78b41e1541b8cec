"""MLflow tracking: where runs go, what every run records, and flat params from configs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tokenflow import storage
from tokenflow.config import TrackingConfig

_REPO = Path(__file__).resolve().parents[2]
_MAX_PARAM_VALUE = 6000


def resolve_tracking_uri(cfg: TrackingConfig, storage_url: str) -> str:
    """The configured URI, else ``MLFLOW_TRACKING_URI``, else a sqlite store under local storage."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if not storage.is_local(storage_url):
        raise ValueError(f"storage {storage_url} is not local: set tracking.tracking_uri (or "
                         "MLFLOW_TRACKING_URI) to an MLflow server")
    path = Path(storage.filesystem(storage_url)[1])
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve() / 'mlflow.db'}"


def ensure_experiment(name: str, storage_url: str) -> str:
    """The experiment id for ``name``, created with artifacts under the storage root if new."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if storage.is_local(storage_url):
        location = Path(storage.filesystem(storage_url)[1]).resolve().joinpath("mlartifacts").as_uri()
    else:
        location = storage.join(storage_url, "mlartifacts")
    return mlflow.create_experiment(name, artifact_location=location)


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
