"""Ray entry point: fine-tune only the pixel decoder of a trained tokenizer (the reference's
second phase; encoders, quantizer and codebooks frozen, so the tokens do not change).

    python pipelines/finetune_decoder.py --config configs/pipelines/tokenflow-b.yaml \\
        --corpus <dir with the corpus _MANIFEST.json> --tokenizer <train_tokenizer output URL> --out <URL>

Run the same command again after an interruption: it resumes from the latest checkpoint.
"""

from __future__ import annotations

from tokenflow import storage
from tokenflow.data.token_shards import MANIFEST_NAME
from tokenflow.stages.entry import mixture_inputs, prepare_stage, stage_parser
from tokenflow.stages.train_tokenizer import run_finetune_decoder


def main() -> None:
    parser = stage_parser(__doc__, mixture=True)
    parser.add_argument("--tokenizer", required=True, help="train_tokenizer output URL (holds _MANIFEST.json)")
    args = parser.parse_args()
    cfg, _ = prepare_stage(args)
    trained = storage.read_json(storage.join(args.tokenizer, MANIFEST_NAME))["tokenizer"]
    manifest = run_finetune_decoder(cfg, mixture_inputs(cfg, "finetune_decoder", args.inputs), storage.join(args.tokenizer, trained["path"]), trained["sha256"],
                                    args.out)
    print(f"tokenizer with the fine-tuned decoder: {storage.join(args.out, manifest['tokenizer']['path'])} "
          f"sha256 {manifest['tokenizer']['sha256']}")


if __name__ == "__main__":
    main()
