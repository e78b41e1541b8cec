"""Next-scale sampling: the KV-cached sampler against full recomputation, and the GenEval stage's
generation throughput before and after (KV cache + prompts batched).

    python -m benchmarks.bench_sampling [--quick] [--repeats 2] [--work-dir DIR]

(1) Sampler speed-up. A randomly initialised small Qwen3 LM (hidden 256, 4 layers) inside the
generator, with random 32,768-entry codebooks (semantic 32 + pixel 8 dims, as TokenFlow-B), at
the 561-token (TokenFlow-B: scales 1..14) and 817-token (TokenFlow-L: 1..16) layouts; the
reference's three-round sampler (top-k 1200/100/1, top-p 0.8/0.8/0, CFG 4.0), one prompt with 2
images (4 rows with the unconditional ones). The same seed in both: the tokens are compared.

(2) GenEval stage throughput: the smoke configuration (tiny tokenizer, the smoke pipeline's
generator LM and sampling, random weights), shapes prompts with 4 images each, sampled, decoded
and scored. Before: one prompt per batch, full recomputation (the stage as it was); after: the
stage's ``generate_images`` (KV cache, ``batch_size`` 16 images per batch, PNGs written in
GenEval's folder layout) and ``score_generated`` (reading them back).

Everything runs in this process with torch's default threads; wall and CPU seconds (the
process's ``process_time``) are both reported, best of ``--repeats``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from benchmarks.common import REPO, TINY_CONFIG, header, parser, ratio_line, table, work_dir

log = logging.getLogger("benchmarks.sampling")

SMALL_LM = {"model_type": "qwen3", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 64, "intermediate_size": 1536, "max_position_embeddings": 2048,
            "tie_word_embeddings": True}
LAYOUTS = {561: (1, 2, 4, 6, 8, 10, 12, 14), 817: (1, 2, 4, 6, 8, 10, 12, 14, 16)}
QUICK_LAYOUTS = {30: (1, 2, 5)}
QUICK_LM = {**SMALL_LM, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 32, "intermediate_size": 128}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """(result, best wall s, best CPU s) of ``repeats`` calls."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return result, best_wall, best_cpu


def _generator(lm_fields: dict[str, Any], scales: tuple[int, ...], codebook_size: int, dims: tuple[int, int]):
    from tokenflow.models.generator import NextScaleGenerator
    from tokenflow.models.language_model import language_model_from_config
    from tokenflow.models.quantizer import CodebookFeatures

    torch.manual_seed(0)
    codebook = CodebookFeatures(scales, torch.randn(codebook_size, dims[0]), torch.randn(codebook_size, dims[1]))
    lm = language_model_from_config({**lm_fields, "vocab_size": 512}, "sdpa")
    return NextScaleGenerator(lm, codebook, image_start_id=4, image_end_id=5, qk_norm=True).eval()


def sampler_speedup(quick: bool, repeats: int) -> dict[str, float]:
    """Part (1): one row per layout, cached vs uncached."""
    from tokenflow.config import SamplingConfig
    from tokenflow.models.generator import left_pad
    from tokenflow.models.sampling import sample_tokens

    sampling = SamplingConfig()  # the reference's three rounds, CFG 4.0
    text = left_pad([[1] + list(range(10, 30))] * 2, pad_id=0)
    negative = left_pad([[1]], pad_id=0)
    rows, ratios = [], {}
    for tokens, scales in (QUICK_LAYOUTS if quick else LAYOUTS).items():
        model = _generator(QUICK_LM if quick else SMALL_LM, scales, 32768, (32, 8))

        def run(use_cache: bool) -> torch.Tensor:
            return sample_tokens(model, text, negative, sampling, torch.Generator().manual_seed(0), use_cache)

        full, full_wall, full_cpu = _timed(lambda: run(False), repeats)
        cached, wall, cpu = _timed(lambda: run(True), repeats)
        same = float((full == cached).float().mean())
        rows += [(f"{tokens} tokens, full recomputation", 2, full_wall, 2 / full_wall, full_cpu, ""),
                 (f"{tokens} tokens, KV cache", 2, wall, 2 / wall, cpu, f"{same:.2%}")]
        ratios[f"speedup_{tokens}"] = full_wall / wall
        ratios[f"speedup_{tokens}_cpu"] = full_cpu / cpu
    table(["sampler", "images", "best wall s", "images/s", "best CPU s", "tokens equal to full"], rows)
    return ratios


def _old_generate_and_score(model, tok, tokenizer, prompts, n, sampling, seed, max_text_tokens, detector,
                            classifier, rules) -> list[bool]:
    """The stage as it was: one prompt per batch, the whole prefix recomputed every round."""
    from PIL import Image

    from tokenflow.eval.geneval import score_image
    from tokenflow.models.generator import left_pad
    from tokenflow.models.sampling import sample_tokens
    from tokenflow.models.text import generation_prompt
    from tokenflow.seeding import seed_for
    from tokenflow.viz import to_uint8

    correct = []
    for i, prompt in enumerate(prompts):
        ids = generation_prompt(tok, prompt.prompt, max_text_tokens)[0]
        text = left_pad([ids] * n, tok.pad_token_id)
        negative = left_pad([generation_prompt(tok, sampling.negative_prompt, max_text_tokens)[0]], tok.pad_token_id)
        tokens = sample_tokens(model, text, negative, sampling,
                               torch.Generator().manual_seed(seed_for(seed, i)), use_cache=False)
        for pixels in to_uint8(tokenizer.decode_indices(tokens).clamp(0, 1)):
            correct.append(score_image(Image.fromarray(pixels), prompt, detector, classifier, rules).correct)
    return correct


def eval_throughput(quick: bool, repeats: int, work: Path) -> dict[str, float]:
    """Part (2): GenEval (shapes) images/s, the old loop vs the stage's generation and scoring."""
    from tokenflow.config import SamplingConfig, load_config
    from tokenflow.data.shapes import generate_scene
    from tokenflow.eval.geneval import GenEvalRules
    from tokenflow.eval.geneval_backends import ShapesColorClassifier, ShapesObjectDetector
    from tokenflow.eval.runners import generate_images, score_generated
    from tokenflow.eval.shapes_geneval import shapes_geneval_prompts
    from tokenflow.models.generator import NextScaleGenerator
    from tokenflow.models.language_model import language_model_from_config
    from tokenflow.models.quantizer import CodebookFeatures
    from tokenflow.models.text import train_bpe
    from tokenflow.models.tokenizer import TokenFlowTokenizer

    smoke = yaml.safe_load((REPO / "configs" / "pipelines" / "smoke.yaml").read_text())["train_generator"]
    cfg = load_config(TINY_CONFIG)
    torch.manual_seed(0)
    tokenizer = TokenFlowTokenizer(cfg.tokenizer, with_teacher=False).eval()
    codebook = CodebookFeatures.from_quantizer(tokenizer.quantizer)
    rng = np.random.default_rng(0)
    prompts = shapes_geneval_prompts((generate_scene(rng) for _ in range(400)), 4)[: 2 if quick else None]
    tok = train_bpe([p.prompt for p in prompts], 300)
    lm = language_model_from_config({**smoke["language_model"]["architecture"], "vocab_size": len(tok)}, "sdpa")
    model = NextScaleGenerator(lm, codebook, image_start_id=4, image_end_id=5, qk_norm=True).eval()
    sampling = SamplingConfig(**smoke["sampling"])
    n, max_text = 4, 64
    scorers = (ShapesObjectDetector(), ShapesColorClassifier(), GenEvalRules())
    args = (model, tok, tokenizer, prompts, n, sampling, 0, max_text)
    outdir = str(work / "geneval_images")

    def stage() -> list:
        failures = generate_images(*args, outdir, batch_size=16)
        return score_generated(outdir, prompts, n, failures, *scorers)

    images = n * len(prompts)
    before, b_wall, b_cpu = _timed(lambda: _old_generate_and_score(*args, *scorers), repeats)
    after, a_wall, a_cpu = _timed(stage, repeats)
    agree = float(np.mean([a.result.correct == b for a, b in zip(after, before)]))
    table(["GenEval (shapes) generation", "prompts x images", "best wall s", "images/s", "best CPU s"],
          [("before: prompt by prompt, full recomputation", f"{len(prompts)} x {n}", b_wall, images / b_wall, b_cpu),
           ("after: batches of 16 images, KV cache", f"{len(prompts)} x {n}", a_wall, images / a_wall, a_cpu)])
    print(f"verdicts equal between the two: {agree:.1%} of {images} images")
    print()
    return {"eval_images_per_s_ratio": b_wall / a_wall, "eval_cpu_ratio": b_cpu / a_cpu}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    header("Next-scale sampling: KV cache and batched GenEval generation")
    ratios = sampler_speedup(args.quick, args.repeats)
    with work_dir(args.work_dir) as work:
        ratios.update(eval_throughput(args.quick, args.repeats, work))
    ratio_line(ratios)


if __name__ == "__main__":
    main()
