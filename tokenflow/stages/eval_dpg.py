"""The ``eval_dpg`` stage: DPG-Bench on the ``train_generator`` export (the shapes set from the
held-out split with the exact shapes VQA, or the release with a transformers VQA model), against
an untrained generator and, on shapes, the tokenizer's reconstructions of the prompts' sources
(see eval_common and :mod:`tokenflow.eval.dpg`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch

from tokenflow import storage
from tokenflow.config import ConfigError, DPGEvalConfig, TokenFlowConfig, config_hash
from tokenflow.data.decode import DecodeError, preprocess
from tokenflow.data.manifest import content_digest, file_digest
from tokenflow.eval.dpg import IMAGES_PER_PROMPT, YES, DPGItem, DPGScores, load_dpg, read_grid, score_dpg
from tokenflow.eval.dpg_runner import ask_grids, ask_image, generate_grids, unanswered
from tokenflow.eval.dpg_vqa import ShapesVQA, TransformersVQA, VQAScorer
from tokenflow.eval.runners import reconstructions
from tokenflow.eval.shapes_dpg import write_shapes_dpg
from tokenflow.models.llm_weights import WEIGHTS_NAME, load_generator
from tokenflow.stages.eval_common import (finish_evaluation, heldout_samples, log_grid, model_under_test,
                                          with_baseline, write_results)
from tokenflow.stages.stage_run import RunLink, StageRun

DPG_DIR = "dpg"
IMAGES_DIR, BASELINE_IMAGES_DIR = "images", "baseline_images"  # <item_id>.png grids, as the official script reads
REFERENCE = "reference/"  # shapes: the prompts' source images through the tokenizer
GRID_PROMPTS = 6
GRID_LEGEND = ("{model}: each row is one prompt's 2x2 grid as its four tiles (top left, top right, bottom left, "
               "bottom right),\nlabelled with its DPG score (mean over the tiles of the questions passed after the "
               "dependency rule) and the prompt; grey: no grid")

DPG_SCHEMA = pa.schema([("item_id", pa.string()), ("prompt", pa.string()), ("tile", pa.int32()),
                        ("proposition_id", pa.int32()), ("category", pa.string()), ("question", pa.string()),
                        ("error", pa.string()), ("answer", pa.string()), ("correct", pa.bool_()),
                        ("prompt_score", pa.float64()), ("baseline_error", pa.string()),
                        ("baseline_answer", pa.string()), ("baseline_correct", pa.bool_()),
                        ("baseline_prompt_score", pa.float64())])


def _vqa(d: DPGEvalConfig, device: torch.device) -> VQAScorer:
    return ShapesVQA() if d.benchmark == "shapes" else TransformersVQA(d.vqa_model_path, device)


def _metrics(scores: DPGScores, failed: int | None = None) -> dict[str, float]:
    return {**scores.metrics(), **({} if failed is None else {"failed_generations": float(failed)})}


def _rows(items: Sequence[DPGItem], answers: Mapping[str, Mapping[str, list[dict[int, str]]]],
          errors: Mapping[str, Mapping[str, str]], scores: Mapping[str, DPGScores]) -> list[dict[str, Any]]:
    """One row per item, tile and question: the trained (``IMAGES_DIR``) and baseline answers."""
    prompt_scores = {name: {p.item_id: p.score for p in s.prompts} for name, s in scores.items()}
    rows = []
    for item in items:
        for tile in range(len(answers[IMAGES_DIR][item.item_id])):
            for q in item.questions:
                row: dict[str, Any] = {"item_id": item.item_id, "prompt": item.prompt, "tile": tile,
                                       "proposition_id": q.proposition_id, "category": q.category,
                                       "question": q.question}
                for name, prefix in ((IMAGES_DIR, ""), (BASELINE_IMAGES_DIR, "baseline_")):
                    answer = answers[name][item.item_id][tile][q.proposition_id]
                    row.update({f"{prefix}error": errors[name].get(item.item_id), f"{prefix}answer": answer,
                                f"{prefix}correct": answer == YES,
                                f"{prefix}prompt_score": prompt_scores[name].get(item.item_id)})
                rows.append(row)
    return rows


def _grid_rows(items: Sequence[DPGItem], outdir: str, scores: DPGScores, size: int,
               cfg: TokenFlowConfig) -> tuple[list[torch.Tensor], list[str]]:
    """The first GRID_PROMPTS items' tiles (grey where no grid), labelled with score and prompt."""
    by_id = {p.item_id: p.score for p in scores.prompts}
    rows, labels = [], []
    for item in items[:GRID_PROMPTS]:
        try:
            tiles = torch.stack([preprocess(tile, size) for tile in read_grid(outdir, item.item_id, cfg.limits)])
        except (FileNotFoundError, DecodeError, ValueError):
            tiles = torch.full((IMAGES_PER_PROMPT, 3, size, size), 0.5)
        score = by_id.get(item.item_id)
        labels.append(f"{item.item_id} {'-' if score is None else f'{score:.2f}'} {item.prompt}")
        rows.append(tiles)
    return rows, labels


def run_eval_dpg(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], generator_dir: str, tokenizer_url: str,
                 out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """DPG-Bench on the ``train_generator`` export in ``generator_dir`` (the shapes set from the
    held-out split, or the release under ``eval.dpg.root_url``); returns the stage manifest."""
    d, t = cfg.eval.dpg, cfg.train_generator
    if t is None:
        raise ConfigError("eval_dpg needs the train_generator section (prompt length, sampling)")
    device, tokenizer, tokenizer_digest, model, tok, baseline = model_under_test(
        cfg, tokenizer_url, generator_dir, load_generator, t.tokenizer_view)

    inputs = {"tokenizer": tokenizer_digest, "generator": file_digest(storage.join(generator_dir, WEIGHTS_NAME))[1]}
    sources: list[bytes] = []
    if d.benchmark == "shapes":
        root = storage.join(out_url, DPG_DIR)
        sourced = write_shapes_dpg(root, (sample for _, sample in heldout_samples(corpus_manifest)), d.shapes_prompts)
        sources = [sample.image or b"" for sample, _ in sourced]
        inputs["corpus_manifest"] = content_digest(corpus_manifest)
    else:
        root = d.root_url
    items = load_dpg(root)
    if not items:
        raise ValueError(f"no DPG-Bench prompts ({d.benchmark}): the held-out split gave none")
    inputs["questions"] = config_hash([[i.item_id, i.prompt, [[q.proposition_id, list(q.parents), q.proposition,
                                                                q.question] for q in i.questions]] for i in items])
    vqa = _vqa(d, device)
    size = tokenizer.cfg.image_size
    scoring = "the upstream scoring bugs" if d.upstream_bugs else "fixed scoring"
    against = " and the tokenizer's reconstructions of the prompts' sources (reference/)." if sources else "."
    with tempfile.TemporaryDirectory() as tmp, StageRun(
            cfg, "eval_dpg", {"eval", "train_generator"}, out_url, inputs, link,
            f"DPG-Bench ({d.benchmark}, {scoring}) of the trained generator, against an untrained one{against}") as run:
        scratch = Path(tmp)
        run.log_dataset("dpg_questions", inputs["questions"], root)
        answers, errors, scores, metrics = {}, {}, {}, {}
        for name, sampled in ((IMAGES_DIR, model), (BASELINE_IMAGES_DIR, baseline)):
            outdir = storage.join(out_url, name)
            failures = generate_grids(sampled, tok, tokenizer, items, t.sampling, cfg.eval.seed,
                                      t.language_model.max_text_tokens, outdir, d.batch_size)
            answers[name], errors[name] = ask_grids(vqa, items, outdir, failures, cfg.limits)
            scores[name] = score_dpg(items, answers[name], d.upstream_bugs)
            metrics[name] = _metrics(scores[name], len(failures))
        write_results(run, scratch, _rows(items, answers, errors, scores), DPG_SCHEMA)
        for name, label, grid in ((IMAGES_DIR, "trained generator", "dpg.png"),
                                  (BASELINE_IMAGES_DIR, "untrained generator (baseline)", "baseline_dpg.png")):
            log_grid(run, scratch, grid, *_grid_rows(items, storage.join(out_url, name), scores[name], size, cfg),
                     title=GRID_LEGEND.format(model=label))
        result = with_baseline(metrics[IMAGES_DIR], metrics[BASELINE_IMAGES_DIR])
        if sources:  # shapes: the ceiling this tokenizer leaves a generator (one tile: the source's round trip)
            images, failed = reconstructions(tokenizer, sources, limits=cfg.limits)
            reference = {item.item_id: [unanswered(item) if i in failed else ask_image(vqa, item, images[i])]
                         for i, item in enumerate(items)}
            result.update({REFERENCE + k: v for k, v in _metrics(score_dpg(items, reference, d.upstream_bugs)).items()})
        return finish_evaluation(run, result, "overall", benchmark=d.benchmark, upstream_bugs=d.upstream_bugs,
                                 images=IMAGES_DIR, baseline_images=BASELINE_IMAGES_DIR,
                                 **({"questions": DPG_DIR} if sources else {}))
