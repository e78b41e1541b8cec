"""Ray entry point: train the generator LLM stage with DeepSpeed ZeRO on Ray Train workers.

    python pipelines/train_generator.py --config configs/pipelines/smoke.yaml \\
        --tokens <pretokenize output URL> --tokenizer <tokenizer.safetensors URL> --out <URL>

With several corpora in train_generator.data, pass --tokens CORPUS=URL once per corpus. It
reads the token shards (never the images). Run the same command again after an
interruption: it resumes from the latest checkpoint.
"""

from __future__ import annotations

from tokenflow import storage
from tokenflow.stages.entry import mixture_inputs, prepare_stage, stage_parser
from tokenflow.stages.train_generator import run_train_generator


def main() -> None:
    parser = stage_parser(__doc__, input_stage="tokens", mixture=True)
    parser.add_argument("--tokenizer", required=True, help="the tokenizer export that made the token shards")
    args = parser.parse_args()
    cfg, _ = prepare_stage(args)
    manifest = run_train_generator(cfg, mixture_inputs(cfg, "train_generator", args.inputs), args.tokenizer, args.out)
    print(f"generator: {storage.join(args.out, manifest['model']['path'])} sha256 {manifest['model']['sha256']}")


if __name__ == "__main__":
    main()
