"""What every pipelines/<stage>.py entry point shares: arguments, logging, config, inputs, Ray."""

from __future__ import annotations

import argparse
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig, load_config
from tokenflow.data.manifest import MANIFEST_NAME
from tokenflow.data.stage_data import StageData
from tokenflow.logs import configure_logging


def stage_parser(doc: str | None, input_stage: str = "corpus", mixture: bool = False) -> argparse.ArgumentParser:
    """A parser with --config, --set, --<input_stage> (the URL of the output the stage reads,
    holding its _MANIFEST.json; with ``mixture``, once per corpus of the stage's ``data`` as
    ``CORPUS=URL``, or one plain URL for a single corpus) and --out; stages add their own arguments."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    if mixture:
        parser.add_argument(f"--{input_stage}", dest="inputs", action="append", required=True, metavar="[CORPUS=]URL",
                            help=f"{input_stage} output URL of each corpus the stage's data names (holds _MANIFEST.json)")
    else:
        parser.add_argument(f"--{input_stage}", dest="input_url", required=True,
                            help=f"{input_stage} output URL (holds _MANIFEST.json)")
    parser.add_argument("--out", required=True, help="stage output URL")
    return parser


def prepare_stage(args: argparse.Namespace) -> tuple[TokenFlowConfig, dict[str, Any] | None]:
    """Configure logging, validate the config, read the input's manifest (None for a mixture's
    inputs, see :func:`mixture_inputs`), then connect to Ray."""
    import ray

    configure_logging()
    cfg = load_config(args.config, args.overrides)
    manifest = storage.read_json(storage.join(args.input_url, MANIFEST_NAME)) if "input_url" in args else None
    ray.init()
    return cfg, manifest


def mixture_inputs(cfg: TokenFlowConfig, section: str, values: list[str]) -> list[StageData]:
    """The stage's mixture (``cfg.stage_data(section)``) with each corpus read from its
    ``CORPUS=URL`` value (a single plain URL: the stage's only corpus)."""
    entries = cfg.stage_data(section)
    if len(values) == 1 and "=" not in values[0] and len(entries) == 1:
        urls = {entries[0].corpus: values[0]}
    else:
        urls = dict(v.split("=", 1) for v in values if "=" in v)
        if len(urls) != len(values) or set(urls) != {e.corpus for e in entries}:
            raise SystemExit(f"{section}: give one CORPUS=URL per corpus of its data "
                             f"({', '.join(e.corpus for e in entries)}), got {values}")
    return [StageData(e.corpus, e.weight, storage.read_json(storage.join(urls[e.corpus], MANIFEST_NAME)),
                      urls[e.corpus]) for e in entries]
