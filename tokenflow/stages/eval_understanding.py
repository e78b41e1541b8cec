"""The ``eval_understanding`` stage: MME on the ``train_understanding`` export (the shapes set from
the held-out split, or the official release), against an untrained model (see eval_common)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from tokenflow import storage
from tokenflow.config import ConfigError, TokenFlowConfig, config_hash
from tokenflow.data.manifest import content_digest, file_digest
from tokenflow.eval.mme import MMEQuestion, load_mme, parse_answer, score_mme
from tokenflow.eval.runners import load_image
from tokenflow.eval.shapes_mme import write_shapes_mme
from tokenflow.models.llm_weights import WEIGHTS_NAME, load_understanding
from tokenflow.stages.eval_common import (answer_with_baseline, finish_evaluation, heldout_samples, log_grid,
                                          model_under_test, with_baseline, write_results)
from tokenflow.stages.stage_run import RunLink, StageRun

MME_DIR = "mme"
GRID_IMAGES_PER_SUBTASK = 2

UNDERSTANDING_SCHEMA = pa.schema([("subtask", pa.string()), ("image", pa.string()), ("question", pa.string()),
                                  ("answer", pa.string()), ("error", pa.string()), ("reply", pa.string()),
                                  ("correct", pa.bool_()), ("baseline_reply", pa.string()),
                                  ("baseline_correct", pa.bool_())])


def _grid_images(questions: list[MMEQuestion], tokens: dict[str, Any]) -> list[str]:
    """Up to GRID_IMAGES_PER_SUBTASK tokenized images of every subtask, in question order."""
    per_subtask: dict[str, list[str]] = {}
    for q in questions:
        chosen = per_subtask.setdefault(q.subtask, [])
        if q.image in tokens and q.image not in chosen and len(chosen) < GRID_IMAGES_PER_SUBTASK:
            chosen.append(q.image)
    return [url for chosen in per_subtask.values() for url in chosen]


def _mme_metrics(questions: list[MMEQuestion], replies: list[str]) -> tuple[dict[str, float], tuple[str, ...]]:
    """MME's metrics plus the question count and unparseable-reply rate; the subtasks not scored."""
    scores = score_mme(questions, replies)
    unparsed = sum(parse_answer(r) == "other" for r in replies)
    return {**scores.metrics(), "num_questions": float(len(questions)),
            "unparsed_rate": unparsed / len(questions)}, scores.missing


def run_eval_understanding(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], understanding_dir: str,
                           tokenizer_url: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """MME on the ``train_understanding`` export in ``understanding_dir`` (the shapes set from
    the held-out split, or the official release); images are tokenized here with the tokenizer
    export. Returns the stage manifest."""
    u = cfg.eval.understanding
    if cfg.train_understanding is None:
        raise ConfigError("eval_understanding needs the train_understanding section (prompt length, "
                          "max_new_tokens)")
    device, tokenizer, tokenizer_digest, model, tok, baseline = model_under_test(
        cfg, tokenizer_url, understanding_dir, load_understanding)

    inputs = {"tokenizer": tokenizer_digest,
              "understanding": file_digest(storage.join(understanding_dir, WEIGHTS_NAME))[1]}
    if u.benchmark == "shapes":
        root = storage.join(out_url, MME_DIR)
        write_shapes_mme(root, (sample for _, sample in heldout_samples(corpus_manifest)), u.shapes_per_subtask)
        inputs["corpus_manifest"] = content_digest(corpus_manifest)
    else:
        root = u.root_url
    questions = load_mme(root)
    inputs["questions"] = config_hash([[q.subtask, storage.basename(q.image), q.question, q.answer]
                                       for q in questions])

    with tempfile.TemporaryDirectory() as tmp, StageRun(
            cfg, "eval_understanding", {"eval", "train_understanding"}, out_url, inputs, link,
            f"MME ({u.benchmark}) of the trained understanding model, against an untrained one.") as run:
        scratch = Path(tmp)
        run.log_dataset("mme_questions", inputs["questions"], root)
        tokens, failed, replies, base_replies = answer_with_baseline(cfg, tokenizer, model, baseline, tok, questions,
                                                                     u.batch_size)
        write_results(run, scratch, [{"subtask": q.subtask, "image": q.image, "question": q.question, "answer": q.answer,
                    "error": failed.get(q.image), "reply": a, "correct": parse_answer(a) == q.answer,
                    "baseline_reply": b, "baseline_correct": parse_answer(b) == q.answer}
                       for q, a, b in zip(questions, replies, base_replies)], UNDERSTANDING_SCHEMA)

        rows, labels = [], []
        for url in _grid_images(questions, tokens):
            asked = [(q, a) for q, a in zip(questions, replies) if q.image == url]
            recon = tokenizer.decode_indices(tokens[url][None].to(device)).cpu()
            rows.append(torch.cat([load_image(url, tokenizer.cfg.image_size, cfg.limits)[None], recon]))
            labels.append("\n".join(f"{q.subtask}: {q.question} expected {q.answer}, replied {a.strip()!r} "
                                    f"({parse_answer(a)})" for q, a in asked))
        if rows:
            log_grid(run, scratch, "answers.png", rows, labels,
                     "each image (as asked, and through the tokenizer) with its questions, the expected "
                     "answer and the model's reply")
        metrics, missing = _mme_metrics(questions, replies)
        metrics = with_baseline({**metrics, "undecodable_images": float(len(failed))},
                                 _mme_metrics(questions, base_replies)[0])
        return finish_evaluation(run, metrics, "perception", benchmark=u.benchmark, missing_subtasks=list(missing))
