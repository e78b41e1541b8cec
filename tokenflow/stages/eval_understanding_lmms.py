"""The ``eval_understanding_lmms`` stage: the lmms-eval tasks of ``eval.lmms`` on the
``train_understanding`` export, offline, against an untrained model (see eval_common). It exists
when ``eval.lmms.tasks`` names any and needs the ``tokenflow-pipeline[lmms]`` extra."""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from tokenflow import storage
from tokenflow.config import ConfigError, TokenFlowConfig
from tokenflow.data.manifest import file_digest
from tokenflow.eval.lmms import (evaluate_tasks, flatten_results, metric_name, require_lmms_eval,
                                 task_folder_digest)
from tokenflow.models.llm_weights import WEIGHTS_NAME, load_understanding
from tokenflow.stages.eval_common import (finish_evaluation, log_output_file, model_under_test, with_baseline,
                                          write_results)
from tokenflow.stages.stage_run import RunLink, StageRun

RESULTS_JSON = "lmms_results.json"
BASELINE_RESULTS_JSON = "lmms_results_baseline.json"

SAMPLES_SCHEMA = pa.schema([("task", pa.string()), ("doc_id", pa.int64()), ("target", pa.string()),
                            ("reply", pa.string()), ("scores", pa.string()), ("baseline_reply", pa.string()),
                            ("baseline_scores", pa.string())])


def _text(value: Any) -> str:
    """A reply or target as text: a lone string as it is, anything else as JSON."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _sample_rows(trained: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per logged sample (per document and filter), the two runs' samples side by side
    (same documents in the same order); ``scores``: the sample's metric values as JSON."""
    rows = []
    for task, samples in trained["samples"].items():
        metrics = list(trained["higher_is_better"].get(task, {}))
        for s, b in zip(samples, baseline["samples"][task], strict=True):
            rows.append({"task": task, "doc_id": s["doc_id"], "target": _text(s["target"]),
                         "reply": _text(s["filtered_resps"]),
                         "scores": json.dumps({m: s[m] for m in metrics if m in s}, default=str),
                         "baseline_reply": _text(b["filtered_resps"]),
                         "baseline_scores": json.dumps({m: b[m] for m in metrics if m in b}, default=str)})
    return rows


def _headline(tasks: Sequence[str], metrics: dict[str, float]) -> str:
    """The first metric (not a standard error) of the first configured task that reported one."""
    for task in tasks:
        prefix = metric_name(task) + "/"
        for name in metrics:
            if name.startswith(prefix) and "_stderr" not in name:
                return name
    raise ValueError(f"lmms-eval reported no numeric metric for the tasks {list(tasks)}")


def _write_results_json(run: StageRun, scratch: Path, name: str, results: dict[str, Any]) -> None:
    """lmms-eval's results without the samples (those go to the table), under the output and logged."""
    body = {k: v for k, v in results.items() if k != "samples"}
    storage.write_bytes_atomic(storage.join(run.out_url, name), json.dumps(body, indent=2, default=str).encode())
    log_output_file(run, scratch, name)


def run_eval_understanding_lmms(cfg: TokenFlowConfig, understanding_dir: str, tokenizer_url: str, out_url: str,
                                link: RunLink | None = None) -> dict[str, Any]:
    """``eval.lmms.tasks`` on the ``train_understanding`` export in ``understanding_dir`` and on an
    untrained model, through lmms-eval with Hugging Face offline. Returns the stage manifest."""
    settings, t = cfg.eval.lmms, cfg.train_understanding
    if t is None:
        raise ConfigError("eval_understanding_lmms needs the train_understanding section (prompt length, "
                          "max_new_tokens)")
    if not settings.tasks:
        raise ConfigError("eval.lmms.tasks is empty: no lmms-eval task to run")
    version = require_lmms_eval()
    from tokenflow.eval.lmms_model import TokenFlowUnderstanding

    _, tokenizer, tokenizer_digest, model, tok, baseline = model_under_test(
        cfg, tokenizer_url, understanding_dir, load_understanding)
    inputs = {"tokenizer": tokenizer_digest,
              "understanding": file_digest(storage.join(understanding_dir, WEIGHTS_NAME))[1]}
    include_path = None
    if settings.include_path:
        inputs["lmms_tasks"] = task_folder_digest(settings.include_path)
        include_path = str(storage.local_path(settings.include_path))

    with tempfile.TemporaryDirectory() as tmp, StageRun(
            cfg, "eval_understanding_lmms", {"eval", "train_understanding"}, out_url, inputs, link,
            f"lmms-eval {', '.join(settings.tasks)} on the trained understanding model, against an untrained "
            "one.") as run:
        scratch = Path(tmp)
        if settings.include_path:
            run.log_dataset("lmms_tasks", inputs["lmms_tasks"], settings.include_path)
        wrap = partial(TokenFlowUnderstanding.from_models, text_tokenizer=tok, image_tokenizer=tokenizer,
                       batch_size=settings.batch_size, max_text_tokens=t.language_model.max_text_tokens,
                       max_new_tokens=t.max_new_tokens)
        args = (settings.tasks, include_path, settings.batch_size, settings.limit, cfg.eval.seed)
        trained = evaluate_tasks(wrap(model), *args)
        untrained = evaluate_tasks(wrap(baseline), *args)
        _write_results_json(run, scratch, RESULTS_JSON, trained)
        _write_results_json(run, scratch, BASELINE_RESULTS_JSON, untrained)
        write_results(run, scratch, _sample_rows(trained, untrained), SAMPLES_SCHEMA)
        metrics = with_baseline(flatten_results(trained["results"]), flatten_results(untrained["results"]))
        return finish_evaluation(run, metrics, _headline(settings.tasks, metrics), tasks=list(settings.tasks),
                                 lmms_eval_version=version)
