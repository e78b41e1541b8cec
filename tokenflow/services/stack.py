"""The three services together, started in dependency order and stopped in reverse."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from pathlib import Path
from typing import Iterator

from tokenflow.services.mlflow_server import AUTH_DB, TRACKING_DB, MlflowServer
from tokenflow.services.object_store import ObjectStore
from tokenflow.services.postgres import Postgres
from tokenflow.services.process import write_secret

log = logging.getLogger(__name__)


class LocalStack:
    """An S3 store, PostgreSQL and an authenticated MLflow server under ``root``."""

    def __init__(self, root: Path, bucket: str = "tokenflow"):
        self.root = root
        self.store = ObjectStore(root / "s3", bucket)
        self.postgres = Postgres(root / "postgres", databases=(TRACKING_DB, AUTH_DB))
        self.mlflow = MlflowServer(root / "mlflow", self.postgres, self.store)

    @property
    def bucket_url(self) -> str:
        return f"s3://{self.store.bucket}"

    @property
    def client_env(self) -> dict[str, str]:
        """What a pipeline run needs: S3 endpoint and key, tracking URI, user and password."""
        return {**self.store.client_env, **self.mlflow.client_env}

    def write_env_file(self, path: Path) -> None:
        """``export`` lines for :attr:`client_env`, readable by the owner only."""
        write_secret(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(self.client_env.items())))

    @contextlib.contextmanager
    def running(self) -> Iterator["LocalStack"]:
        """Start everything; stop everything that started, whatever happens."""
        env = dict(os.environ)
        started = []
        try:
            started.append(self.store)
            self.store.start(env)
            started.append(self.postgres)
            self.postgres.start()
            started.append(self.mlflow)
            self.mlflow.start(env)
            log.info("local stack up: S3 %s (bucket %s), MLflow %s", self.store.endpoint,
                     self.store.bucket, self.mlflow.uri)
            yield self
        finally:
            for service in reversed(started):
                try:
                    service.stop()
                except Exception:  # keep stopping the others
                    log.exception("stopping %s failed", type(service).__name__)
