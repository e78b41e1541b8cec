"""The ``eval_pope`` stage: POPE on the ``train_understanding`` export (the shapes set from the
held-out split, or the official release), against an untrained model (see eval_common)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch
from transformers import PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.config import ConfigError, TokenFlowConfig, config_hash
from tokenflow.data.manifest import content_digest, file_digest
from tokenflow.eval.pope import POPEQuestion, answer_to, load_pope, score_pope
from tokenflow.eval.runners import answer_questions, load_image
from tokenflow.eval.shapes_pope import IMAGES_DIR, SHAPES_FILES, write_shapes_pope
from tokenflow.models.llm_weights import WEIGHTS_NAME, load_understanding
from tokenflow.models.understanding import UnderstandingModel
from tokenflow.stages.eval_common import (answer_with_baseline, finish_evaluation, heldout_samples, log_grid,
                                          model_under_test, with_baseline, write_results)
from tokenflow.stages.stage_run import RunLink, StageRun

POPE_DIR = "pope"
GRID_IMAGES = 4
GRID_SPLIT = "random"

POPE_SCHEMA = pa.schema([("split", pa.string()), ("question_id", pa.int64()), ("image", pa.string()),
                         ("question", pa.string()), ("label", pa.string()), ("error", pa.string()),
                         ("reply", pa.string()), ("answer", pa.string()), ("correct", pa.bool_()),
                         ("baseline_reply", pa.string()), ("baseline_answer", pa.string()),
                         ("baseline_correct", pa.bool_())])


@dataclass(frozen=True)
class _Prompt:
    """One distinct (image, question as asked): the splits share their positive questions."""

    image: str
    question: str


def _replies(model: UnderstandingModel, tok: PreTrainedTokenizerBase, questions: Sequence[POPEQuestion],
             tokens: Mapping[str, torch.Tensor], batch_size: int, max_new_tokens: int, max_text_tokens: int,
             suffix: str) -> list[str | None]:
    """Greedy replies in question order, each distinct prompt (``suffix`` appended) asked once;
    ``None`` where the image has no tokens."""
    prompts = list(dict.fromkeys(_Prompt(q.image, q.question + suffix) for q in questions if q.image in tokens))
    answered = dict(zip(prompts, answer_questions(model, tok, prompts, tokens, batch_size, max_new_tokens,
                                                  max_text_tokens)))
    return [answered.get(_Prompt(q.image, q.question + suffix)) for q in questions]


def _metrics(questions: Sequence[POPEQuestion], replies: Sequence[str | None]) -> dict[str, float]:
    return {**score_pope(questions, replies).metrics(), "num_images": float(len({q.image for q in questions}))}


def run_eval_pope(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], understanding_dir: str,
                  tokenizer_url: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """POPE on the ``train_understanding`` export in ``understanding_dir`` (the shapes set from
    the held-out split, or the official release); images are tokenized here with the tokenizer
    export. Returns the stage manifest."""
    p = cfg.eval.pope
    if cfg.train_understanding is None:
        raise ConfigError("eval_pope needs the train_understanding section (prompt length, max_new_tokens)")
    device, tokenizer, tokenizer_digest, model, tok, baseline = model_under_test(
        cfg, tokenizer_url, understanding_dir, load_understanding)

    inputs = {"tokenizer": tokenizer_digest,
              "understanding": file_digest(storage.join(understanding_dir, WEIGHTS_NAME))[1]}
    if p.benchmark == "shapes":
        root, files = storage.join(out_url, POPE_DIR), SHAPES_FILES
        image_root = storage.join(root, IMAGES_DIR)
        write_shapes_pope(root, (sample for _, sample in heldout_samples(corpus_manifest)), p.shapes_images,
                          cfg.eval.seed, cfg.limits)
        inputs["corpus_manifest"] = content_digest(corpus_manifest)
    else:
        root, image_root, files = p.root_url, p.image_root_url, p.files
    questions = load_pope(root, image_root, files, cfg.limits)
    inputs["questions"] = config_hash([[q.split, q.question_id, storage.basename(q.image), q.question, q.label]
                                       for q in questions])

    with tempfile.TemporaryDirectory() as tmp, StageRun(
            cfg, "eval_pope", {"eval", "train_understanding"}, out_url, inputs, link,
            f"POPE ({p.benchmark}) of the trained understanding model, against an untrained one.") as run:
        scratch = Path(tmp)
        run.log_dataset("pope_questions", inputs["questions"], root)
        tokens, failed, replies, base_replies = answer_with_baseline(
            cfg, tokenizer, model, baseline, tok, questions, p.batch_size, partial(_replies, suffix=p.question_suffix))
        rows = []
        for q, a, b in zip(questions, replies, base_replies):
            answer, base_answer = answer_to(q, a), answer_to(q, b)
            rows.append({"split": q.split, "question_id": q.question_id, "image": q.image, "question": q.question,
                         "label": q.label, "error": failed.get(q.image), "reply": a, "answer": answer,
                         "correct": answer == q.label, "baseline_reply": b, "baseline_answer": base_answer,
                         "baseline_correct": base_answer == q.label})
        write_results(run, scratch, rows, POPE_SCHEMA)

        grid, labels = [], []
        for url in [u for u in dict.fromkeys(q.image for q in questions) if u in tokens][:GRID_IMAGES]:
            recon = tokenizer.decode_indices(tokens[url][None].to(device)).cpu()
            grid.append(torch.cat([load_image(url, tokenizer.cfg.image_size, cfg.limits)[None], recon]))
            labels.append("\n".join(f"{r['question']} expected {r['label']}, replied {r['reply']!r} ({r['answer']})"
                                    for r in rows if r["image"] == url and r["split"] == GRID_SPLIT))
        if grid:
            log_grid(run, scratch, "answers.png", grid, labels,
                     f"each image (as asked, and through the tokenizer) with its {GRID_SPLIT}-split questions, "
                     "the expected answer and the model's reply")
        metrics = with_baseline({**_metrics(questions, replies), "undecodable_images": float(len(failed))},
                                _metrics(questions, base_replies))
        return finish_evaluation(run, metrics, "f1", benchmark=p.benchmark)
