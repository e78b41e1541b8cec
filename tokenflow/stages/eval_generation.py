"""The ``eval_generation`` stage: GenEval on the ``train_generator`` export (the shapes prompt set
from the held-out split, or the official metadata), against an untrained generator and, on
shapes, the tokenizer's own reconstructions of the prompts' source images (see eval_common)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import torch

from tokenflow import storage
from tokenflow.config import ConfigError, GenerationEvalConfig, TokenFlowConfig
from tokenflow.data.manifest import content_digest, file_digest
from tokenflow.eval.geneval import GenEvalPrompt, GenEvalRules, load_metadata, summarize, write_metadata
from tokenflow.eval.runners import (Generation, generate_images, load_generated, score_generated,
                                    score_reconstructions)
from tokenflow.eval.shapes_geneval import write_shapes_geneval_prompts
from tokenflow.models.llm_weights import WEIGHTS_NAME, load_generator
from tokenflow.stages.eval_common import (finish_evaluation, heldout_samples, log_grid, log_output_file,
                                          model_under_test, with_baseline, write_results)
from tokenflow.stages.stage_run import RunLink, StageRun

PROMPTS_NAME = "prompts.jsonl"
IMAGES_DIR, BASELINE_IMAGES_DIR = "images", "baseline_images"  # GenEval's folder layout (geneval_layout)
REFERENCE = "reference/"  # shapes: the prompts' source images through the tokenizer
GRID_PROMPTS_PER_TAG = 2
GRID_LEGEND = ("{model}: each row is one prompt (its GenEval tag, one mark per image left to right, the prompt);\n"
               "+ the image passes the prompt's GenEval rule, - it fails; grey: generation failed")

GENERATION_SCHEMA = pa.schema([("prompt_index", pa.int32()), ("prompt", pa.string()), ("tag", pa.string()),
                               ("index", pa.int32()), ("correct", pa.bool_()), ("reason", pa.string()),
                               ("baseline_correct", pa.bool_()), ("baseline_reason", pa.string())])


def _scorers(g: GenerationEvalConfig, device: torch.device):
    """(detector, colour classifier) of the configured benchmark."""
    from tokenflow.eval import geneval_backends as backends

    if g.benchmark == "shapes":
        return backends.ShapesObjectDetector(), backends.ShapesColorClassifier()
    return (backends.TransformersObjectDetector(g.detector_path, device, g.detector_min_score),
            backends.OpenClipColorClassifier(g.clip_model, g.clip_weights, device))


def _geneval_metrics(generations: list[Generation]) -> dict[str, float]:
    return {**summarize(g.result for g in generations).metrics(),
            "failed_generations": float(sum(g.failed for g in generations))}


def _grid_prompts(prompts: Sequence[GenEvalPrompt]) -> set[int]:
    """Indices of the first GRID_PROMPTS_PER_TAG prompts of each tag."""
    per_tag: Counter[str] = Counter()
    shown = set()
    for i, prompt in enumerate(prompts):
        if per_tag[prompt.tag] < GRID_PROMPTS_PER_TAG:
            per_tag[prompt.tag] += 1
            shown.add(i)
    return shown


def _generation_grid(prompts: Sequence[GenEvalPrompt], shown: set[int], generations: list[Generation],
                     images: dict[int, torch.Tensor], n: int, size: int) -> tuple[list[torch.Tensor], list[str]]:
    """One row per shown prompt: its images (grey where generation failed), labelled with the
    tag, pass (+) / fail (-) per image and the prompt."""
    rows, labels = [], []
    for i in sorted(shown):
        marks = "".join("+" if g.result.correct else "-" for g in generations if g.prompt_index == i)
        rows.append(images.get(i, torch.full((n, 3, size, size), 0.5)))
        labels.append(f"{prompts[i].tag} {marks} {prompts[i].prompt}")
    return rows, labels


def run_eval_generation(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], generator_dir: str,
                        tokenizer_url: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """GenEval on the ``train_generator`` export in ``generator_dir`` (the shapes prompt set from
    the held-out split, or the official metadata); returns the stage manifest."""
    g, t = cfg.eval.generation, cfg.train_generator
    if t is None:
        raise ConfigError("eval_generation needs the train_generator section (prompt length, sampling)")
    device, tokenizer, tokenizer_digest, model, tok, baseline = model_under_test(
        cfg, tokenizer_url, generator_dir, load_generator, t.tokenizer_view)

    prompts_url = storage.join(out_url, PROMPTS_NAME)
    inputs = {"tokenizer": tokenizer_digest, "generator": file_digest(storage.join(generator_dir, WEIGHTS_NAME))[1]}
    sources: list[bytes] = []
    if g.benchmark == "shapes":
        samples = (sample for _, sample in heldout_samples(corpus_manifest))
        sourced = write_shapes_geneval_prompts(prompts_url, samples, g.shapes_per_tag)
        prompts = [prompt for _, prompt in sourced]
        sources = [sample.image or b"" for sample, _ in sourced]
        inputs["corpus_manifest"] = content_digest(corpus_manifest)
    else:
        prompts = load_metadata(g.metadata_url)
        write_metadata(prompts_url, prompts)
    if not prompts:
        raise ValueError(f"no GenEval prompts ({g.benchmark}): the held-out split gave none")
    inputs["prompts"] = file_digest(prompts_url)[1]

    detector, classifier = _scorers(g, device)
    rules = GenEvalRules(**g.rules.model_dump())
    shown = _grid_prompts(prompts)
    size = tokenizer.cfg.image_size
    sample = (prompts, g.images_per_prompt, g.sampling or t.sampling, cfg.eval.seed,
              t.language_model.max_text_tokens)
    with tempfile.TemporaryDirectory() as tmp, StageRun(
            cfg, "eval_generation", {"eval", "train_generator"}, out_url, inputs, link,
            f"GenEval ({g.benchmark}) of the trained generator, against an untrained one"
            + (" and the tokenizer's reconstructions of the prompts' sources (reference/)." if sources else ".")) as run:
        scratch = Path(tmp)
        log_output_file(run, scratch, PROMPTS_NAME)
        run.log_dataset("geneval_prompts", inputs["prompts"], prompts_url)
        scored = {}
        for name, sampled in ((IMAGES_DIR, model), (BASELINE_IMAGES_DIR, baseline)):
            outdir = storage.join(out_url, name)
            failures = generate_images(sampled, tok, tokenizer, *sample, outdir, g.batch_size)
            scored[name] = score_generated(outdir, prompts, g.images_per_prompt, failures, detector, classifier,
                                           rules, cfg.limits)
        generations, base_generations = scored[IMAGES_DIR], scored[BASELINE_IMAGES_DIR]
        write_results(run, scratch, [{"prompt_index": a.prompt_index, "prompt": a.result.prompt, "tag": a.result.tag, "index": a.index,
                    "correct": a.result.correct, "reason": a.result.reason, "baseline_correct": b.result.correct,
                    "baseline_reason": b.result.reason} for a, b in zip(generations, base_generations)],
                      GENERATION_SCHEMA)
        for name, label, results, grid in ((IMAGES_DIR, "trained generator", generations, "generations.png"),
                                           (BASELINE_IMAGES_DIR, "untrained generator (baseline)", base_generations,
                                            "baseline_generations.png")):
            images = {i: loaded for i in shown if (loaded := load_generated(
                storage.join(out_url, name), i, g.images_per_prompt, size, cfg.limits)) is not None}
            log_grid(run, scratch, grid, *_generation_grid(prompts, shown, results, images, g.images_per_prompt, size),
                     title=GRID_LEGEND.format(model=label))
        metrics = with_baseline(_geneval_metrics(generations), _geneval_metrics(base_generations))
        if sources:  # shapes: the ceiling this tokenizer leaves a generator
            reference = score_reconstructions(tokenizer, sources, prompts, detector, classifier, rules,
                                              limits=cfg.limits)
            metrics.update({REFERENCE + k: v for k, v in summarize(reference).metrics().items()})
        return finish_evaluation(run, metrics, "overall", benchmark=g.benchmark, prompts=PROMPTS_NAME,
                                 images=IMAGES_DIR, baseline_images=BASELINE_IMAGES_DIR)
