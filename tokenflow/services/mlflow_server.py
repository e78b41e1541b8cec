"""An MLflow tracking server as teams run it: basic auth, a PostgreSQL backend store (runs and the
user store in their own databases), artifacts proxied to S3 so clients need no bucket keys.
Every secret reaches the server through its environment or a private file, none through argv."""

from __future__ import annotations

import secrets
import sys
import urllib.request
from pathlib import Path

from tokenflow.services.object_store import ObjectStore
from tokenflow.services.postgres import Postgres
from tokenflow.services.process import ServiceProcess, free_port, write_secret

ADMIN_USER = "admin"
TRACKING_DB, AUTH_DB = "mlflow", "mlflow_auth"


class MlflowServer:
    """``mlflow server --app-name basic-auth`` on loopback; ``client_env`` is what a pipeline
    needs to log to it (tracking URI, user name and password)."""

    def __init__(self, data_dir: Path, postgres: Postgres, store: ObjectStore, artifact_prefix: str = "mlflow"):
        self.data_dir = data_dir
        self.postgres = postgres
        self.store = store
        self.artifacts = f"s3://{store.bucket}/{artifact_prefix}"
        self.admin_password = secrets.token_urlsafe(24)
        self.port = 0
        self.process: ServiceProcess | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}

    def start(self, env: dict[str, str], timeout_s: float = 120.0) -> "MlflowServer":
        """Write the auth config, start the server with ``env`` plus its secrets, wait for /health."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        auth_config = self.data_dir / "basic_auth.ini"
        write_secret(auth_config, "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                      f"database_uri = {self.postgres.uri(AUTH_DB)}\nadmin_username = {ADMIN_USER}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      # each request would otherwise re-run the password hash: most of the
                      # server's CPU under a training stage's metric logging
                      "auth_cache_ttl_seconds = 60\n")
        server_env = {
            **env, **self.postgres.client_env, **self.store.client_env,
            "MLFLOW_S3_ENDPOINT_URL": self.store.endpoint,
            "MLFLOW_BACKEND_STORE_URI": self.postgres.uri(TRACKING_DB),
            "MLFLOW_ARTIFACTS_DESTINATION": self.artifacts,
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
        }
        argv = [str(Path(sys.executable).parent / "mlflow"), "server", "--app-name", "basic-auth",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.process = ServiceProcess("mlflow-server", argv, self.data_dir / "mlflow-server.log", env=server_env)
        self.process.wait_until(self._healthy, timeout_s)
        return self

    def _healthy(self) -> bool:
        with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
            return response.status == 200

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
