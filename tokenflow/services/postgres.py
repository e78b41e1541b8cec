"""PostgreSQL on loopback for the MLflow backend store: a fresh cluster with one password-protected
database. Clients find the password in a libpq password file (``PGPASSFILE``), never in a URI
or an argument list."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

from tokenflow.services.process import ServiceError, ServiceProcess, free_port, write_secret

BIN_DIRS = [Path(f"/usr/lib/postgresql/{v}/bin") for v in (17, 16, 15)]
SERVICE_USER = "postgres"  # initdb refuses root; as root the server runs as this account


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else Debian's versioned directory."""
    found = shutil.which(name) or next((str(d / name) for d in BIN_DIRS if (d / name).exists()), None)
    if found is None:
        raise ServiceError(f"PostgreSQL's {name} not found (install Debian's postgresql package)")
    return found


class Postgres:
    """A PostgreSQL cluster serving ``databases`` owned by ``user``; logs and the password
    file go to ``data_dir``, the cluster itself to a private temporary directory that the
    service account can reach (removed on stop)."""

    def __init__(self, data_dir: Path, databases: tuple[str, ...] = ("mlflow",), user: str = "mlflow"):
        self.data_dir = data_dir
        self.databases = databases
        self.user = user
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.process: ServiceProcess | None = None
        self.passfile = data_dir / "pgpass"
        self.cluster_root: Path | None = None

    def uri(self, database: str) -> str:
        """SQLAlchemy URI of ``database`` without the password (libpq reads it from ``PGPASSFILE``)."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def client_env(self) -> dict[str, str]:
        return {"PGPASSFILE": str(self.passfile)}

    def start(self, timeout_s: float = 60.0) -> "Postgres":
        """initdb (as the service account when running as root), start, create the databases."""
        as_user = SERVICE_USER if os.geteuid() == 0 else None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_root = Path(tempfile.mkdtemp(prefix="tokenflow-postgres-"))
        cluster = self.cluster_root / "cluster"
        self.port = free_port()
        superpass = self.cluster_root / "superuser.pw"
        write_secret(superpass, secrets.token_urlsafe(24))
        if as_user:
            shutil.chown(self.cluster_root, as_user)
            shutil.chown(superpass, as_user)
        initdb = ServiceProcess("initdb", [postgres_bin("initdb"), "-D", str(cluster), "-U", "postgres",
                                           "--auth=scram-sha-256", f"--pwfile={superpass}", "-E", "UTF8"],
                                self.data_dir / "initdb.log", user=as_user)
        if initdb.proc.wait(120) != 0:
            raise ServiceError(f"initdb failed:\n{initdb.log_tail()}")
        self.process = ServiceProcess(
            "postgres", [postgres_bin("postgres"), "-D", str(cluster), "-h", "127.0.0.1", "-p", str(self.port),
                         "-k", str(self.cluster_root)],
            self.data_dir / "postgres.log", user=as_user, stop_signal=signal.SIGINT)  # fast shutdown
        superuser = {"user": "postgres", "password": superpass.read_text()}
        self.process.wait_until(lambda: self._connect(**superuser).close() is None, timeout_s)
        conn = self._connect(**superuser)
        try:
            conn.autocommit = True  # CREATE DATABASE runs outside a transaction
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {self.user} LOGIN PASSWORD %s", (self.password,))
                for database in self.databases:
                    cur.execute(f"CREATE DATABASE {database} OWNER {self.user}")
        finally:
            conn.close()
        write_secret(self.passfile, f"127.0.0.1:{self.port}:*:{self.user}:{self.password}\n")
        return self

    def _connect(self, user: str, password: str):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=user, password=password,
                                dbname="postgres", connect_timeout=2)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.cluster_root is not None:
            shutil.rmtree(self.cluster_root, ignore_errors=True)

