"""Ray entry point: pre-tokenize a corpus into Parquet token shards.

    python pipelines/pretokenize.py --config configs/models/tokenflow-tiny.yaml \\
        --corpus <corpus dir with _MANIFEST.json> --tokenizer <weights.safetensors> --out <URL>

Untracked (no MLflow run; the pipeline's stage has one). With ``--generation-view`` the
tokenizer is used at ``train_generator.tokenizer_view`` (the ``pretokenize_generation`` stage of
the pipeline).
"""

from __future__ import annotations

from tokenflow.stages.entry import prepare_stage, stage_parser
from tokenflow.stages.pretokenize import pretokenize_corpus


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--tokenizer", required=True, help="tokenizer weights (.safetensors) URL")
    parser.add_argument("--generation-view", action="store_true",
                        help="encode at train_generator.tokenizer_view (the generator's tokens)")
    args = parser.parse_args()
    cfg, corpus = prepare_stage(args)
    view = cfg.generation_view if args.generation_view else None
    if args.generation_view and view is None:
        parser.error("--generation-view needs train_generator.tokenizer_view in the config")
    manifest = pretokenize_corpus(corpus, args.tokenizer, args.out, cfg.pretokenize, view, cfg.limits)
    for split, block in manifest["splits"].items():
        print(f"{split}: {block['rows']} tokenized, {block['quarantined']} quarantined")


if __name__ == "__main__":
    main()
