"""Run the local stack until interrupted: ``python -m tokenflow.services --dir DIR``.

Writes ``DIR/client.env`` (mode 600) with the variables a pipeline run needs; ``source`` it in
the shell that starts Ray and submits the job."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from tokenflow.logs import configure_logging
from tokenflow.services.stack import LocalStack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="where the services keep data and logs")
    parser.add_argument("--bucket", default="tokenflow")
    args = parser.parse_args()
    configure_logging()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalStack(args.dir.resolve(), args.bucket).running() as stack:
        env_file = args.dir.resolve() / "client.env"
        stack.write_env_file(env_file)
        print(f"ready: storage {stack.bucket_url}/<prefix>, tracking {stack.mlflow.uri}; "
              f"client variables in {env_file}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
