"""Ray entry point: evaluate the tokenizer, the generator (GenEval or DPG-Bench) or the
understanding model (MME or POPE).

    python pipelines/evaluate.py reconstruction --config configs/pipelines/smoke.yaml \\
        --corpus <corpus output URL> --tokenizer <tokenizer.safetensors URL> --out <URL>
    python pipelines/evaluate.py generation ... --model <train_generator output>/model --out <URL>
    python pipelines/evaluate.py understanding ... --model <train_understanding output>/model --out <URL>
    python pipelines/evaluate.py pope ... --model <train_understanding output>/model --out <URL>
    python pipelines/evaluate.py dpg ... --model <train_generator output>/model --out <URL>

The benchmark comes from the config's eval section (shapes sets from the corpus' held-out split,
or GenEval/DPG-Bench/MME/POPE data); it runs in this process on eval.device. Metrics, the per-sample table and
grids go to MLflow and under --out (see docs/evaluation.md).
"""

from __future__ import annotations

from tokenflow import storage
from tokenflow.stages.entry import prepare_stage, stage_parser
from tokenflow.stages.eval_dpg import run_eval_dpg
from tokenflow.stages.eval_generation import run_eval_generation
from tokenflow.stages.eval_pope import run_eval_pope
from tokenflow.stages.eval_reconstruction import run_eval_reconstruction
from tokenflow.stages.eval_understanding import run_eval_understanding

HEADLINE = {"reconstruction": "psnr", "generation": "overall", "understanding": "perception", "pope": "f1",
            "dpg": "overall"}


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("stage", choices=sorted(HEADLINE))
    parser.add_argument("--tokenizer", required=True, help="tokenizer export (.safetensors) URL")
    parser.add_argument("--model", help="the LLM stage's export directory (generation, dpg, understanding, pope)")
    args = parser.parse_args()
    if args.stage != "reconstruction" and not args.model:
        parser.error(f"{args.stage} needs --model")
    cfg, corpus = prepare_stage(args)
    if args.stage == "reconstruction":
        manifest = run_eval_reconstruction(cfg, corpus, args.tokenizer, args.out)
    elif args.stage == "generation":
        manifest = run_eval_generation(cfg, corpus, args.model, args.tokenizer, args.out)
    elif args.stage == "dpg":
        manifest = run_eval_dpg(cfg, corpus, args.model, args.tokenizer, args.out)
    elif args.stage == "understanding":
        manifest = run_eval_understanding(cfg, corpus, args.model, args.tokenizer, args.out)
    else:
        manifest = run_eval_pope(cfg, corpus, args.model, args.tokenizer, args.out)
    key, metrics = HEADLINE[args.stage], manifest["metrics"]
    print(f"{args.stage}: {key} {metrics[key]:.4g} (untrained baseline {metrics['baseline/' + key]:.4g}); "
          f"per-sample results {storage.join(args.out, manifest['results'])}")


if __name__ == "__main__":
    main()
