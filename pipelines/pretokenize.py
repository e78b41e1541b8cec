"""Ray entry point: pre-tokenize a corpus into Parquet token shards.

    python pipelines/pretokenize.py --config configs/models/tokenflow-tiny.yaml \\
        --corpus <corpus dir with _MANIFEST.json> --tokenizer <weights.safetensors> --out <URL>
"""

from __future__ import annotations

import argparse
import logging

import ray

from tokenflow import storage
from tokenflow.config import load_config
from tokenflow.data.token_shards import MANIFEST_NAME
from tokenflow.stages.pretokenize import run_pretokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--corpus", required=True, help="corpus output URL (holds _MANIFEST.json)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer weights (.safetensors) URL")
    parser.add_argument("--out", required=True, help="output URL for the token shards")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    corpus = storage.read_json(storage.join(args.corpus, MANIFEST_NAME))
    ray.init()
    manifest = run_pretokenize(corpus, args.tokenizer, args.out, cfg.pretokenize)
    for split, block in manifest["splits"].items():
        print(f"{split}: {block['rows']} tokenized, {block['quarantined']} quarantined")


if __name__ == "__main__":
    main()
