"""What the three evaluation stages share: the device, the tokenizer and model under test with
its untrained baseline, held-out samples, and the result table, grids and manifest of the run.

Each evaluation runs in the calling process (the Ray driver in the pipeline; nothing inside uses
Ray) on ``eval.device``, inside its :class:`~tokenflow.stages.stage_run.StageRun`. It scores the
trained model and an untrained one of the same architecture (seeded; ``baseline/`` metrics, same
run) and writes under its output: the benchmark set it built, ``results.parquet`` (one row per
image or question, trained and baseline side by side) and ``_MANIFEST.json`` last. The table and
image grids are MLflow artifacts too.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.config import TokenFlowConfig, TokenizerView
from tokenflow.data.corpus import RawSample, iter_record
from tokenflow.data.manifest import shard_records
from tokenflow.eval.runners import Question, answer_questions, check_codebook, encode_images, untrained_like
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.understanding import UnderstandingModel
from tokenflow.models.weights import file_sha256, load_tokenizer
from tokenflow.stages.stage_run import StageRun
from tokenflow.viz import save_image_grid

RESULTS_NAME = "results.parquet"
RESULTS_TABLE = "results_table.json"
BASELINE = "baseline/"


def resolve_device(setting: str) -> torch.device:
    """``eval.device``: ``auto`` is CUDA when this process has it."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def load_tokenizer_export(tokenizer_url: str, device: torch.device, view: TokenizerView | None = None
                          ) -> tuple[TokenFlowTokenizer, str]:
    """The tokenizer export on ``device`` (at ``view`` when given) and its sha256."""
    path = storage.local_path(tokenizer_url)
    return load_tokenizer(path, device, view).eval(), file_sha256(path)


def model_under_test(cfg: TokenFlowConfig, tokenizer_url: str, model_dir: str, load: Callable[[str], tuple],
                     view: TokenizerView | None = None):
    """(device, tokenizer at ``view``, its digest, the exported LLM model, its text tokenizer, the
    untrained baseline of the same architecture), after checking the model reads these codes."""
    device = resolve_device(cfg.eval.device)
    tokenizer, tokenizer_digest = load_tokenizer_export(tokenizer_url, device, view)
    model, tok = load(model_dir)
    model.to(device)
    check_codebook(model.codebook, tokenizer, model_dir)
    return device, tokenizer, tokenizer_digest, model, tok, untrained_like(model, cfg.eval.seed)


class Answers(NamedTuple):
    """A question set answered by the trained model and by its baseline, replies in question order."""

    tokens: dict[str, torch.Tensor]  # image URL -> its tokens (CPU), for the images that decoded
    failed: dict[str, str]  # image URL -> why it could not be decoded
    replies: list
    baseline_replies: list


def answer_with_baseline(cfg: TokenFlowConfig, tokenizer: TokenFlowTokenizer, model: UnderstandingModel,
                         baseline: UnderstandingModel, tok: PreTrainedTokenizerBase, questions: Sequence[Question],
                         batch_size: int, answer: Callable[..., list] = answer_questions) -> Answers:
    """Tokenize the questions' images once, then answer every question with the trained model and
    with the untrained baseline: ``answer(model, tok, questions, tokens, batch_size, max_new_tokens,
    max_text_tokens)`` (:func:`~tokenflow.eval.runners.answer_questions` by default), with
    ``train_understanding``'s generation lengths."""
    t = cfg.train_understanding
    tokens, failed = encode_images(tokenizer, [q.image for q in questions], batch_size, cfg.limits)
    args = (questions, tokens, batch_size, t.max_new_tokens, t.language_model.max_text_tokens)
    return Answers(tokens, failed, answer(model, tok, *args), answer(baseline, tok, *args))


def with_baseline(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    return {**metrics, **{BASELINE + k: v for k, v in baseline.items()}}


def heldout_samples(corpus_manifest: dict[str, Any]) -> Iterator[tuple[str, RawSample]]:
    """(shard name, sample) for every held-out sample, in manifest order."""
    for record in shard_records(corpus_manifest, "heldout"):
        for sample in iter_record(record):
            yield record.name, sample


def log_output_file(run: StageRun, scratch: Path, name: str) -> None:
    """Log a file the stage wrote under its output (any URL) as an artifact."""
    local = scratch / name
    local.write_bytes(storage.read_bytes(storage.join(run.out_url, name)))
    run.artifact(local)


def log_grid(run: StageRun, scratch: Path, name: str, rows: Sequence[torch.Tensor], labels: Sequence[str],
             title: str | None = None) -> None:
    """An image grid (tiles at least 128 px, labels and ``title`` whole) under ``grids/``."""
    scale = max(1, 128 // rows[0].shape[-1])
    run.artifact(save_image_grid(scratch / name, rows, labels, scale, title), "grids")


def write_results(run: StageRun, scratch: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Write ``results.parquet`` under the stage's output and log it, and the same rows as an
    MLflow table (``results_table.json``, which the UI renders)."""
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(storage.join(run.out_url, RESULTS_NAME), buf.getvalue())
    log_output_file(run, scratch, RESULTS_NAME)
    run.client.log_table(run.run_id, data=table.to_pandas(), artifact_file=RESULTS_TABLE)


def finish_evaluation(run: StageRun, metrics: dict[str, float], headline: str, **extra: Any) -> dict[str, Any]:
    """Log the metrics and finish the run with the evaluation's manifest (written last); the
    run's description states the ``headline`` metric against its baselines."""
    run.metrics(metrics)
    against = ", ".join(f"{prefix.rstrip('/')} {metrics[prefix + headline]:.4g}" for prefix in (BASELINE, "reference/")
                        if prefix + headline in metrics)
    return run.finish({"kind": run.stage, "metrics": metrics, "results": RESULTS_NAME, **extra},
                      f"{headline}: {metrics[headline]:.4g} ({against})")
