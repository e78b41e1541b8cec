"""Ray entry point: train the TokenFlow tokenizer with DeepSpeed ZeRO on Ray Train workers.

    python pipelines/train_tokenizer.py --config configs/models/tokenflow-tiny.yaml \\
        --corpus <dir with the corpus _MANIFEST.json> --out <URL> [--set train_tokenizer.steps=500]

With several corpora in train_tokenizer.data, pass --corpus CORPUS=URL once per corpus. Run the
same command again after an interruption: it resumes from the latest checkpoint.
"""

from __future__ import annotations

from tokenflow import storage
from tokenflow.stages.entry import mixture_inputs, prepare_stage, stage_parser
from tokenflow.stages.train_tokenizer import run_train_tokenizer


def main() -> None:
    args = stage_parser(__doc__, mixture=True).parse_args()
    cfg, _ = prepare_stage(args)
    manifest = run_train_tokenizer(cfg, mixture_inputs(cfg, "train_tokenizer", args.inputs), args.out)
    print(f"tokenizer: {storage.join(args.out, manifest['tokenizer']['path'])} "
          f"sha256 {manifest['tokenizer']['sha256']}")


if __name__ == "__main__":
    main()
