"""Ray entry point: train the understanding LLM stage with DeepSpeed ZeRO on Ray Train workers.

    python pipelines/train_understanding.py --config configs/pipelines/smoke.yaml \\
        --tokens <pretokenize output URL> --tokenizer <tokenizer.safetensors URL> --out <URL>

With several corpora in train_understanding's data and align_data, pass --tokens CORPUS=URL once
per corpus. It reads the token shards (never the images). Run the same command again after an
interruption: it resumes from the latest checkpoint.
"""

from __future__ import annotations

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.stages.entry import mixture_inputs, prepare_stage, stage_parser
from tokenflow.stages.train_understanding import run_train_understanding


def _values_for(cfg: TokenFlowConfig, section: str, values: list[str]) -> list[str]:
    """The --tokens values of the corpora in ``section``'s mixture (a plain URL: every mixture's)."""
    corpora = {e.corpus for e in cfg.stage_data(section)}
    return [v for v in values if "=" not in v or v.split("=", 1)[0] in corpora]


def main() -> None:
    parser = stage_parser(__doc__, input_stage="tokens", mixture=True)
    parser.add_argument("--tokenizer", required=True, help="the tokenizer export that made the token shards")
    args = parser.parse_args()
    cfg, _ = prepare_stage(args)
    known = {e.corpus for e in cfg.understanding_data}
    if unknown := [v for v in args.inputs if "=" in v and v.split("=", 1)[0] not in known]:
        parser.error(f"--tokens {unknown}: no such corpus in train_understanding's data or align_data "
                     f"({', '.join(sorted(known))})")
    def inputs(section: str) -> list:
        return mixture_inputs(cfg, section, _values_for(cfg, section, args.inputs))

    align = inputs("train_understanding.align") if cfg.train_understanding.align_steps else []
    data = inputs("train_understanding")
    manifest = run_train_understanding(cfg, align, data, args.tokenizer, args.out)
    print(f"understanding: {storage.join(args.out, manifest['model']['path'])} sha256 {manifest['model']['sha256']}")


if __name__ == "__main__":
    main()
