"""``tokenflow``: run one piece of the pipeline or inspect its inputs and outputs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

from tokenflow.config import ConfigError, config_hash, load_config
from tokenflow.logs import configure_logging

log = logging.getLogger("tokenflow")

DEFAULT_MODEL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "models" / "tokenflow-tiny.yaml"


def _add_config_args(parser: argparse.ArgumentParser, default: Path | None = None) -> None:
    parser.add_argument("--config", type=Path, default=default, required=default is None,
                        help="YAML config file" + (f" (default: {default.name})" if default else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. tokenizer.quantizer.codebook_size=4096 (repeatable)")


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the resolved config as YAML, followed by its hash."""
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# config hash: {config_hash(cfg)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Tokenize a procedurally drawn image with the configured tokenizer and report token counts."""
    from tokenflow.demo import run_demo

    run_demo(load_config(args.config, args.overrides).tokenizer, args.out, seed=args.seed)
    return 0


def cmd_corpus_shapes(args: argparse.Namespace) -> int:
    """Write the shapes corpus (webdataset shards, held-out split) and its manifest."""
    from tokenflow.config import CorpusConfig, ShapesCorpusConfig
    from tokenflow.stages.corpus import build_corpus

    shapes = ShapesCorpusConfig(num_samples=args.num_samples, shard_size=args.shard_size, seed=args.seed,
                                heldout_fraction=args.heldout_fraction, image_size=args.image_size)
    manifest = build_corpus(CorpusConfig(source="shapes", shapes=shapes), args.out)
    for split, block in manifest["splits"].items():
        print(f"{split}: {len(block['shards'])} shards, {block['samples']} samples")
    return 0


def cmd_corpus_index(args: argparse.Namespace) -> int:
    """Index existing shards (webdataset or parquet), or pack LLaVA-style JSON, into a corpus manifest."""
    from tokenflow.config import CorpusConfig, LlavaConfig
    from tokenflow.stages.corpus import build_corpus

    if (args.format == "llava") != bool(args.image_root):
        print("--image-root goes with --format llava (and it needs one)", file=sys.stderr)
        return 2
    llava = LlavaConfig(image_root=args.image_root) if args.format == "llava" else None
    cfg = CorpusConfig(source="url", url=args.url, format=args.format, heldout_url=args.heldout_url,
                       heldout_shards=args.heldout_shards, llava=llava)
    manifest = build_corpus(cfg, args.out)
    for split, block in manifest["splits"].items():
        print(f"{split}: {len(block['shards'])} shards, {block['samples']} samples")
    return 0


def cmd_shards_verify(args: argparse.Namespace) -> int:
    """Check a token-shard output: digests, schema, and count reconciliation."""
    from tokenflow.data.verify import verify_token_shards

    problems = verify_token_shards(args.url)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    if problems:
        print(f"{args.url}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.url}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenflow", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved, validated config and its hash")
    _add_config_args(show)
    show.set_defaults(func=cmd_config_show)

    demo = sub.add_parser("demo", help="tokenize a sample image and print token counts")
    _add_config_args(demo, DEFAULT_MODEL_CONFIG)
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="where the image grid goes")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    corpus = sub.add_parser("corpus", help="make or index corpora").add_subparsers(dest="action", required=True)
    shapes = corpus.add_parser("shapes", help="write the procedural shapes corpus")
    shapes.add_argument("--out", required=True, help="output URL (path, file://, memory://, s3://...)")
    shapes.add_argument("--num-samples", type=int, required=True)
    shapes.add_argument("--shard-size", type=int, required=True)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--heldout-fraction", type=float, default=0.1)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.set_defaults(func=cmd_corpus_shapes)
    index = corpus.add_parser("index", help="index existing .tar/.parquet shards (or pack LLaVA JSON) into a manifest")
    index.add_argument("url", help="directory, glob or file of training shards; the JSON file with --format llava")
    index.add_argument("--out", required=True, help="where _MANIFEST.json goes")
    index.add_argument("--format", choices=("auto", "webdataset", "parquet", "llava"), default="auto")
    index.add_argument("--image-root", help="URL the LLaVA records' image paths are relative to (--format llava)")
    index.add_argument("--heldout-url", default=None)
    index.add_argument("--heldout-shards", type=int, default=1)
    index.set_defaults(func=cmd_corpus_index)

    shards = sub.add_parser("shards", help="inspect token shards").add_subparsers(dest="action", required=True)
    verify = shards.add_parser("verify", help="check digests, schema and counts against the manifest")
    verify.add_argument("url", help="the pretokenize output directory (holds _MANIFEST.json)")
    verify.set_defaults(func=cmd_shards_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """Console entry point: :func:`main`, then exit without interpreter teardown, where pyarrow's
    Parquet threads can rarely abort a finished command with SIGABRT (apache/arrow#34314),
    replacing its exit code. Every output is written and flushed before that."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
