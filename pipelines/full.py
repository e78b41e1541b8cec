"""The whole TokenFlow pipeline as one Ray job: corpus, tokenizer, token shards, both LLM
stages and every evaluation, each stage durable (skipped when complete, resumed when partial).

    ray job submit --working-dir . -- python pipelines/full.py --config configs/pipelines/smoke.yaml
    python pipelines/full.py --config configs/pipelines/smoke.yaml --dry-run

Outputs go to ``<storage>/<stage>/<hash12>/`` (``--storage``, else $TOKENFLOW_STORAGE, else
./outputs); MLflow records one parent run per invocation with a nested run per stage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tokenflow.config import ConfigError, load_config
from tokenflow.data.corpus import CorpusError
from tokenflow.logs import configure_logging
from tokenflow.redaction import redact
from tokenflow.workflow.runner import PlanError, describe, plan, run_pipeline


def _storage_root(value: str | None) -> str:
    root = value or os.environ.get("TOKENFLOW_STORAGE") or "outputs"
    return root if "://" in root else str(Path(root).resolve())


def mlflow_hint(tracking_uri: str, experiment: str) -> str:
    """How to open this run's experiment: the UI command as typed from the repository, and its URL."""
    import mlflow

    found = mlflow.MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    url = f"http://127.0.0.1:5000/#/experiments/{found.experiment_id}" if found else "http://127.0.0.1:5000"
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {redact(tracking_uri).rstrip('/')}/#/experiments/{found.experiment_id if found else ''}"
    return f"MLflow: .venv/bin/mlflow ui --backend-store-uri {redact(tracking_uri)} --port 5000, then open {url}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--storage", help="root URL of every stage's output (default: $TOKENFLOW_STORAGE or ./outputs)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", metavar="STAGE", help="run just this stage (its inputs must be complete); "
                       "--dry-run lists the stages")
    group.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and everything after it")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (stage, hash, cached or not) and exit")
    args = parser.parse_args()
    configure_logging()

    try:  # validated before any cluster work
        cfg = load_config(args.config, args.overrides)
        storage_root = _storage_root(args.storage)
        if args.dry_run:
            print(describe(plan(cfg, storage_root, args.only, args.start)))
            return 0
    except (ConfigError, PlanError, CorpusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray

    ray.init()
    manifests = run_pipeline(cfg, storage_root, args.config, args.only, args.start, args.overrides)
    print(f"pipeline complete: {len(manifests)} stages under {redact(storage_root)}")
    print(mlflow_hint(os.environ["MLFLOW_TRACKING_URI"], cfg.tracking.experiment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
