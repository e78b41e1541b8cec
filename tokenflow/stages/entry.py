"""What every pipelines/<stage>.py entry point shares: arguments, logging, config, corpus, Ray."""

from __future__ import annotations

import argparse
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig, load_config
from tokenflow.data.manifest import MANIFEST_NAME
from tokenflow.logs import configure_logging


def stage_parser(doc: str | None, input_stage: str = "corpus") -> argparse.ArgumentParser:
    """A parser with --config, --set, --<input_stage> (the URL of the output the stage reads,
    holding its _MANIFEST.json) and --out; stages add their own arguments."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(f"--{input_stage}", dest="input_url", required=True,
                        help=f"{input_stage} output URL (holds _MANIFEST.json)")
    parser.add_argument("--out", required=True, help="stage output URL")
    return parser


def prepare_stage(args: argparse.Namespace) -> tuple[TokenFlowConfig, dict[str, Any]]:
    """Configure logging, validate the config, read the input's manifest, then connect to Ray."""
    import ray

    configure_logging()
    cfg = load_config(args.config, args.overrides)
    manifest = storage.read_json(storage.join(args.input_url, MANIFEST_NAME))
    ray.init()
    return cfg, manifest
