"""What every pipelines/<stage>.py entry point shares: arguments, logging, config, corpus, Ray."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig, load_config
from tokenflow.data.token_shards import MANIFEST_NAME


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser with --config, --set, --corpus and --out; stages add their own arguments."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--corpus", required=True, help="corpus output URL (holds _MANIFEST.json)")
    parser.add_argument("--out", required=True, help="stage output URL")
    return parser


def prepare_stage(args: argparse.Namespace) -> tuple[TokenFlowConfig, dict[str, Any]]:
    """Configure logging, validate the config, read the corpus manifest, then connect to Ray."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    corpus = storage.read_json(storage.join(args.corpus, MANIFEST_NAME))
    ray.init()
    return cfg, corpus
