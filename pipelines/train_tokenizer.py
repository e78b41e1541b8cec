"""Ray entry point: train the TokenFlow tokenizer with DeepSpeed ZeRO on Ray Train workers.

    python pipelines/train_tokenizer.py --config configs/models/tokenflow-tiny.yaml \\
        --corpus <dir with the corpus _MANIFEST.json> --out <URL> [--set train_tokenizer.steps=500]

Run the same command again after an interruption: it resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging

import ray

from tokenflow import storage
from tokenflow.config import load_config
from tokenflow.data.token_shards import MANIFEST_NAME
from tokenflow.stages.train_tokenizer import run_train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--corpus", required=True, help="corpus output URL (holds _MANIFEST.json)")
    parser.add_argument("--out", required=True, help="stage output URL (checkpoints, export, manifest)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    corpus = storage.read_json(storage.join(args.corpus, MANIFEST_NAME))
    ray.init()
    manifest = run_train_tokenizer(cfg, corpus, args.out)
    print(f"tokenizer: {storage.join(args.out, manifest['tokenizer']['path'])} "
          f"sha256 {manifest['tokenizer']['sha256']}")


if __name__ == "__main__":
    main()
