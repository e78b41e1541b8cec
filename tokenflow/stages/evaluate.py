"""The evaluation stages: reconstruction (tokenizer), GenEval (generator), MME (understanding).

Each runs in the calling process (the Ray driver in the pipeline; nothing inside uses Ray) on
``eval.device``. It opens its MLflow run (nested under ``parent_run_id``), scores the trained
model and an untrained one of the same architecture (seeded; ``baseline/`` metrics, same run),
and writes under ``out_url``: the benchmark set it built (``prompts.jsonl`` or ``mme/``),
``results.parquet`` (one row per image or question, trained and baseline side by side) and
``_MANIFEST.json`` last. The table and image grids are MLflow artifacts too.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tokenflow import storage
from tokenflow.config import ConfigError, GenerationEvalConfig, TokenFlowConfig, TokenizerView, config_hash
from tokenflow.data.corpus import RawSample, iter_shard
from tokenflow.data.decode import DecodeError, decode_image, preprocess
from tokenflow.data.manifest import file_digest, manifest_digest, shard_records
from tokenflow.data.token_shards import MANIFEST_NAME
from tokenflow.eval.geneval import GenEvalPrompt, GenEvalRules, load_metadata, summarize, write_metadata
from tokenflow.eval.mme import MMEQuestion, load_mme, parse_answer, score_mme
from tokenflow.eval.reconstruction import evaluate_reconstruction
from tokenflow.eval.runners import (Generation, answer_questions, check_codebook, encode_images,
                                    generate_and_score, load_image, score_reconstructions, untrained_like,
                                    untrained_tokenizer)
from tokenflow.eval.shapes_geneval import write_shapes_geneval_prompts
from tokenflow.eval.shapes_mme import write_shapes_mme
from tokenflow.models.llm_weights import WEIGHTS_NAME, load_generator, load_understanding
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.weights import file_sha256, load_tokenizer
from tokenflow.viz import save_image_grid
from tokenflow.workflow.tracking import start_stage_run

log = logging.getLogger(__name__)

RESULTS_NAME = "results.parquet"
PROMPTS_NAME = "prompts.jsonl"
MME_DIR = "mme"
BASELINE = "baseline/"
REFERENCE = "reference/"  # eval_generation, shapes: the prompts' source images through the tokenizer
GRID_IMAGES = 8
GRID_PROMPTS_PER_TAG = 2

RECONSTRUCTION_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("error", pa.string()),
                                   ("psnr", pa.float64()), ("ssim", pa.float64()),
                                   ("baseline_psnr", pa.float64()), ("baseline_ssim", pa.float64())])
GENERATION_SCHEMA = pa.schema([("prompt_index", pa.int32()), ("prompt", pa.string()), ("tag", pa.string()),
                               ("index", pa.int32()), ("correct", pa.bool_()), ("reason", pa.string()),
                               ("baseline_correct", pa.bool_()), ("baseline_reason", pa.string())])
UNDERSTANDING_SCHEMA = pa.schema([("subtask", pa.string()), ("image", pa.string()), ("question", pa.string()),
                                  ("answer", pa.string()), ("error", pa.string()), ("reply", pa.string()),
                                  ("correct", pa.bool_()), ("baseline_reply", pa.string()),
                                  ("baseline_correct", pa.bool_())])


class _StageRun:
    """An eval stage's MLflow run, its output URL and a scratch directory for artifacts."""

    def __init__(self, cfg: TokenFlowConfig, stage: str, sections: set[str], out_url: str,
                 inputs: dict[str, str], parent_run_id: str | None, scratch: str):
        import mlflow

        _, self.run_id, params = start_stage_run(cfg, stage, sections, out_url, inputs, parent_run_id)
        self.client = mlflow.MlflowClient()
        self.stage, self.out_url, self.inputs = stage, out_url, inputs
        self.config_hash = params["config_hash"]
        self.scratch = Path(scratch)

    def artifact(self, path: Path, directory: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), directory)

    def output_artifact(self, name: str) -> None:
        """Log a file the stage wrote under ``out_url`` (any URL)."""
        local = self.scratch / name
        local.write_bytes(storage.read_bytes(storage.join(self.out_url, name)))
        self.artifact(local)

    def grid(self, name: str, rows: Sequence[torch.Tensor], labels: Sequence[str]) -> None:
        scale = max(1, 128 // rows[0].shape[-1])
        self.artifact(save_image_grid(self.scratch / name, rows, labels, scale), "grids")

    def table(self, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
        """Write ``results.parquet`` under ``out_url`` and log it."""
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        storage.write_bytes_atomic(storage.join(self.out_url, RESULTS_NAME), buf.getvalue())
        self.output_artifact(RESULTS_NAME)

    def finish(self, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
        """Log the metrics, write the manifest last, close the run; returns the manifest."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in sorted(metrics.items())])
        manifest = {"kind": self.stage, "metrics": metrics, "results": RESULTS_NAME, "inputs": self.inputs,
                    "config_hash": self.config_hash, "mlflow_run_id": self.run_id, **extra}
        storage.write_json_atomic(storage.join(self.out_url, MANIFEST_NAME), manifest)
        self.client.set_terminated(self.run_id, "FINISHED")
        return manifest


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _tokenizer(tokenizer_url: str, device: torch.device, view: TokenizerView | None = None
               ) -> tuple[TokenFlowTokenizer, str]:
    """The tokenizer export on ``device`` (at ``view`` when given) and its sha256."""
    path = storage.local_path(tokenizer_url)
    return load_tokenizer(path, device, view).eval(), file_sha256(path)


def _model_under_test(cfg: TokenFlowConfig, tokenizer_url: str, model_dir: str, load: Callable[[str], tuple],
                      view: TokenizerView | None = None):
    """(device, tokenizer at ``view``, its digest, the exported LLM model, its text tokenizer, the
    untrained baseline of the same architecture), after checking the model reads these codes."""
    device = _device(cfg.eval.device)
    tokenizer, tokenizer_digest = _tokenizer(tokenizer_url, device, view)
    model, tok = load(model_dir)
    model.to(device)
    check_codebook(model.codebook, tokenizer, model_dir)
    return device, tokenizer, tokenizer_digest, model, tok, untrained_like(model, cfg.eval.seed)


def _with_baseline(metrics: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    return {**metrics, **{BASELINE + k: v for k, v in baseline.items()}}


def _heldout_samples(corpus_manifest: dict[str, Any]) -> Iterator[tuple[str, RawSample]]:
    """(shard name, sample) for every held-out sample, in manifest order."""
    for record in shard_records(corpus_manifest, "heldout"):
        for sample in iter_shard(record.url):
            yield record.name, sample


# --------------------------------------------------------------------------- reconstruction


def _heldout_batches(corpus_manifest: dict[str, Any], size: int, batch_size: int, max_images: int | None,
                     seen: list[dict[str, Any]]) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Batches of decoded held-out images preprocessed to ``size``; every sample read is
    appended to ``seen`` as ``{key, shard, error}`` (error: why it could not be used, else None)."""
    keys: list[str] = []
    images: list[torch.Tensor] = []
    used = 0
    for shard, sample in _heldout_samples(corpus_manifest):
        if max_images is not None and used >= max_images:
            break
        error = sample.problem
        if error is None:
            try:
                images.append(preprocess(decode_image(sample.image or b""), size))
            except DecodeError as exc:
                error = exc.reason
        seen.append({"key": sample.key, "shard": shard, "error": error})
        if error is not None:
            continue
        keys.append(sample.key)
        used += 1
        if len(keys) == batch_size:
            yield keys, torch.stack(images)
            keys, images = [], []
    if keys:
        yield keys, torch.stack(images)


def run_eval_reconstruction(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], tokenizer_url: str,
                            out_url: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """PSNR, SSIM, rFID (when Inception weights are configured) and codebook usage of the
    tokenizer's round trip on the held-out images; returns the stage manifest."""
    from tokenflow.eval.fid import InceptionFeatureExtractor

    r = cfg.eval.reconstruction
    device = _device(cfg.eval.device)
    tokenizer, tokenizer_digest = _tokenizer(tokenizer_url, device)
    baseline = untrained_tokenizer(tokenizer.cfg, cfg.eval.seed).to(device)
    size = tokenizer.cfg.image_size
    inputs = {"corpus_manifest": manifest_digest(corpus_manifest), "tokenizer": tokenizer_digest}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        run = _StageRun(cfg, "eval_reconstruction", {"eval"}, out_url, inputs, parent_run_id, scratch)
        extractor = None
        if r.fid.inception_weights:
            extractor = InceptionFeatureExtractor(r.fid.inception_weights, r.fid.architecture).to(device)
        else:
            skipped["rfid"] = "eval.reconstruction.fid.inception_weights is not set"
            log.info("rFID skipped: %s", skipped["rfid"])
            run.client.set_tag(run.run_id, "tokenflow.skipped.rfid", skipped["rfid"])
        seen: list[dict[str, Any]] = []
        report = evaluate_reconstruction(
            tokenizer, _heldout_batches(corpus_manifest, size, r.batch_size, r.max_images, seen), extractor)
        base = evaluate_reconstruction(
            baseline, _heldout_batches(corpus_manifest, size, r.batch_size, r.max_images, []), extractor)
        undecodable = [s for s in seen if s["error"] is not None]
        if undecodable:
            log.warning("%d held-out samples could not be decoded (listed in %s)", len(undecodable), RESULTS_NAME)
        scores = iter(zip(report.samples, base.samples))  # the decoded samples, in order
        rows = []
        for s in seen:
            row = dict(s)
            if s["error"] is None:
                trained, untrained = next(scores)
                row.update(psnr=trained.psnr, ssim=trained.ssim, baseline_psnr=untrained.psnr,
                           baseline_ssim=untrained.ssim)
            rows.append(row)
        run.table(rows, RECONSTRUCTION_SCHEMA)

        _, first = next(_heldout_batches(corpus_manifest, size, GRID_IMAGES, None, []))
        first = first.to(device)
        run.grid("reconstructions.png",
                 [first, tokenizer.decode_indices(tokenizer.encode(first)),
                  baseline.decode_indices(baseline.encode(first))],
                 ["original", "reconstruction", "untrained tokenizer"])
        metrics = _with_baseline({**report.metrics(), "undecodable_images": float(len(undecodable))}, base.metrics())
        return run.finish(metrics, skipped=skipped)


# --------------------------------------------------------------------------- generation


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
        labels.append(f"{prompts[i].tag} {marks} {prompts[i].prompt}"[:80])
    return rows, labels


def run_eval_generation(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], generator_dir: str,
                        tokenizer_url: str, out_url: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """GenEval on the ``train_generator`` export in ``generator_dir`` (the shapes prompt set from
    the held-out split, or the official metadata); returns the stage manifest."""
    g, t = cfg.eval.generation, cfg.train_generator
    if t is None:
        raise ConfigError("eval_generation needs the train_generator section (prompt length, sampling)")
    device, tokenizer, tokenizer_digest, model, tok, baseline = _model_under_test(
        cfg, tokenizer_url, generator_dir, load_generator, t.tokenizer_view)

    prompts_url = storage.join(out_url, PROMPTS_NAME)
    inputs = {"tokenizer": tokenizer_digest, "generator": file_digest(storage.join(generator_dir, WEIGHTS_NAME))[1]}
    sources: list[bytes] = []
    if g.benchmark == "shapes":
        samples = (sample for _, sample in _heldout_samples(corpus_manifest))
        sourced = write_shapes_geneval_prompts(prompts_url, samples, g.shapes_per_tag)
        prompts = [prompt for _, prompt in sourced]
        sources = [sample.image or b"" for sample, _ in sourced]
        inputs["corpus_manifest"] = manifest_digest(corpus_manifest)
    else:
        prompts = load_metadata(g.metadata_url)
        write_metadata(prompts_url, prompts)
    if not prompts:
        raise ValueError(f"no GenEval prompts ({g.benchmark}): the held-out split gave none")
    inputs["prompts"] = file_digest(prompts_url)[1]

    detector, classifier = _scorers(g, device)
    rules = GenEvalRules(**g.rules.model_dump())
    shown = _grid_prompts(prompts)
    args = (prompts, g.images_per_prompt, g.sampling or t.sampling, cfg.eval.seed,
            t.language_model.max_text_tokens, detector, classifier, rules, shown)
    with tempfile.TemporaryDirectory() as scratch:
        run = _StageRun(cfg, "eval_generation", {"eval", "train_generator"}, out_url, inputs, parent_run_id, scratch)
        run.output_artifact(PROMPTS_NAME)
        generations, images = generate_and_score(model, tok, tokenizer, *args)
        base_generations, base_images = generate_and_score(baseline, tok, tokenizer, *args)
        run.table([{"prompt_index": a.prompt_index, "prompt": a.result.prompt, "tag": a.result.tag, "index": a.index,
                    "correct": a.result.correct, "reason": a.result.reason, "baseline_correct": b.result.correct,
                    "baseline_reason": b.result.reason} for a, b in zip(generations, base_generations)],
                  GENERATION_SCHEMA)
        size = tokenizer.cfg.image_size
        run.grid("generations.png", *_generation_grid(prompts, shown, generations, images, g.images_per_prompt, size))
        run.grid("baseline_generations.png",
                 *_generation_grid(prompts, shown, base_generations, base_images, g.images_per_prompt, size))
        metrics = _with_baseline(_geneval_metrics(generations), _geneval_metrics(base_generations))
        if sources:  # shapes: the ceiling this tokenizer leaves a generator
            reference = score_reconstructions(tokenizer, sources, prompts, detector, classifier, rules)
            metrics.update({REFERENCE + k: v for k, v in summarize(reference).metrics().items()})
        return run.finish(metrics, benchmark=g.benchmark, prompts=PROMPTS_NAME)


# --------------------------------------------------------------------------- understanding


def _mme_metrics(questions: list[MMEQuestion], replies: list[str]) -> tuple[dict[str, float], tuple[str, ...]]:
    """MME's metrics plus the question count and unparseable-reply rate; the subtasks not scored."""
    scores = score_mme(questions, replies)
    unparsed = sum(parse_answer(r) == "other" for r in replies)
    return {**scores.metrics(), "num_questions": float(len(questions)),
            "unparsed_rate": unparsed / len(questions)}, scores.missing


def run_eval_understanding(cfg: TokenFlowConfig, corpus_manifest: dict[str, Any], understanding_dir: str,
                           tokenizer_url: str, out_url: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """MME on the ``train_understanding`` export in ``understanding_dir`` (the shapes set from
    the held-out split, or the official release); images are tokenized here with the tokenizer
    export. Returns the stage manifest."""
    u, t = cfg.eval.understanding, cfg.train_understanding
    if t is None:
        raise ConfigError("eval_understanding needs the train_understanding section (prompt length, "
                          "max_new_tokens)")
    device, tokenizer, tokenizer_digest, model, tok, baseline = _model_under_test(
        cfg, tokenizer_url, understanding_dir, load_understanding)

    inputs = {"tokenizer": tokenizer_digest,
              "understanding": file_digest(storage.join(understanding_dir, WEIGHTS_NAME))[1]}
    if u.benchmark == "shapes":
        root = storage.join(out_url, MME_DIR)
        write_shapes_mme(root, (sample for _, sample in _heldout_samples(corpus_manifest)), u.shapes_per_subtask)
        inputs["corpus_manifest"] = manifest_digest(corpus_manifest)
    else:
        root = u.root_url
    questions = load_mme(root)
    inputs["questions"] = config_hash([[q.subtask, storage.basename(q.image), q.question, q.answer]
                                       for q in questions])

    with tempfile.TemporaryDirectory() as scratch:
        run = _StageRun(cfg, "eval_understanding", {"eval", "train_understanding"}, out_url, inputs, parent_run_id,
                        scratch)
        tokens, failed = encode_images(tokenizer, [q.image for q in questions], u.batch_size)
        args = (questions, tokens, u.batch_size, t.max_new_tokens, t.language_model.max_text_tokens)
        replies = answer_questions(model, tok, *args)
        base_replies = answer_questions(baseline, tok, *args)
        run.table([{"subtask": q.subtask, "image": q.image, "question": q.question, "answer": q.answer,
                    "error": failed.get(q.image), "reply": a, "correct": parse_answer(a) == q.answer,
                    "baseline_reply": b, "baseline_correct": parse_answer(b) == q.answer}
                   for q, a, b in zip(questions, replies, base_replies)], UNDERSTANDING_SCHEMA)

        shown = [url for url in dict.fromkeys(q.image for q in questions) if url in tokens][:GRID_IMAGES]
        rows, labels = [], []
        for url in shown:
            asked = [(q, a) for q, a in zip(questions, replies) if q.image == url]
            recon = tokenizer.decode_indices(tokens[url][None].to(device)).cpu()
            rows.append(torch.cat([load_image(url, tokenizer.cfg.image_size)[None], recon]))
            labels.append(f"{asked[0][0].subtask}: " + " ".join(f"{q.answer}>{parse_answer(a)}" for q, a in asked))
        if rows:
            run.grid("answers.png", rows, labels)
        metrics, missing = _mme_metrics(questions, replies)
        metrics = _with_baseline({**metrics, "undecodable_images": float(len(failed))},
                                 _mme_metrics(questions, base_replies)[0])
        return run.finish(metrics, benchmark=u.benchmark, missing_subtasks=list(missing))
