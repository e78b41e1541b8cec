"""Ray entry point: pre-tokenize a corpus into Parquet token shards.

    python pipelines/pretokenize.py --config configs/models/tokenflow-tiny.yaml \\
        --corpus <corpus dir with _MANIFEST.json> --tokenizer <weights.safetensors> --out <URL>
"""

from __future__ import annotations

from tokenflow.stages.entry import prepare_stage, stage_parser
from tokenflow.stages.pretokenize import run_pretokenize


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--tokenizer", required=True, help="tokenizer weights (.safetensors) URL")
    args = parser.parse_args()
    cfg, corpus = prepare_stage(args)
    manifest = run_pretokenize(corpus, args.tokenizer, args.out, cfg.pretokenize)
    for split, block in manifest["splits"].items():
        print(f"{split}: {block['rows']} tokenized, {block['quarantined']} quarantined")


if __name__ == "__main__":
    main()
