"""lmms-eval glue that imports without the ``tokenflow-pipeline[lmms]`` extra: the model entry
point, offline runs of a task list, and lmms-eval's results as MLflow metrics.

lmms-eval itself is imported only inside the functions that need it (its import takes about ten
seconds); the model class is :class:`tokenflow.eval.lmms_model.TokenFlowUnderstanding`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from tokenflow import storage
from tokenflow.config import ConfigError, config_hash

log = logging.getLogger(__name__)

MODEL_ID = "tokenflow_understanding"
MODEL_ALIASES = ("tokenflow",)
MODEL_CLASS = "tokenflow.eval.lmms_model.TokenFlowUnderstanding"
INSTALL_HINT = "install the extra: pip install 'tokenflow-pipeline[lmms]' (pip install -e '.[lmms]' in a checkout)"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

_UNSAFE = re.compile(r"[^A-Za-z0-9_. -]+")


def model_manifests() -> list[Any]:
    """The ``lmms_eval.models`` entry point: the understanding model under ``tokenflow_understanding``
    (alias ``tokenflow``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(MODEL_ID, simple_class_path=MODEL_CLASS, aliases=MODEL_ALIASES)]


def require_lmms_eval() -> str:
    """lmms-eval's version; ``ImportError`` naming the extra when it is not installed."""
    from importlib import import_module, metadata

    try:
        import_module("lmms_eval")
        return metadata.version("lmms-eval")
    except ImportError as exc:
        raise ImportError(f"lmms-eval is not installed: {INSTALL_HINT}") from exc


def task_folder_digest(url: str) -> str:
    """sha256 over the relative path, size and version (ETag, else modification time) of every file
    under the task folder ``url``: it changes when a task file is edited, added or removed."""
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ConfigError(f"eval.lmms.include_path {url} is not a folder")
    return config_hash({path[len(root) + 1 :]: f"{info.get('size')}:{storage.object_version(info)}"
                        for path, info in fs.find(root, detail=True).items()})


@contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face Hub and datasets offline for the block (restored after): the variables are
    set, and the flags both libraries computed from them when first imported are switched too."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
             (datasets.config, "HF_DATASETS_OFFLINE")]
    saved_env = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    saved_flags = [getattr(module, name) for module, name in flags]
    os.environ.update({name: "1" for name in OFFLINE_VARIABLES})
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def evaluate_tasks(model: Any, tasks: Sequence[str], include_path: str | None, batch_size: int,
                   limit: int | None, seed: int) -> dict[str, Any]:
    """lmms-eval's ``simple_evaluate`` of ``model`` (an lmms instance) on ``tasks``, offline,
    with per-sample logs: lmms-eval's built-in tasks plus those of the ``include_path`` folder."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    with hf_offline():
        manager = TaskManager("WARNING", include_path=include_path)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"lmms-eval knows no task {unknown} (built-in, or in include_path {include_path})")
        return simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, batch_size=batch_size,
                               limit=limit, log_samples=True, bootstrap_iters=0, verbosity="WARNING",
                               random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                               fewshot_random_seed=seed)


def metric_name(*parts: str) -> str:
    """``/``-joined parts as an MLflow metric name: characters other than ASCII letters, digits,
    ``_ . -`` and space become ``_``, and no path segment is empty, ``.`` or ``..`` (MLflow refuses
    names that normalise to another path)."""
    segments = []
    for part in parts:
        for segment in part.split("/"):
            segment = _UNSAFE.sub("_", segment).strip()
            if segment:
                segments.append(segment if segment.strip(".") else segment.replace(".", "_"))
    return "/".join(segments)


def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Every finite numeric value of lmms-eval's ``results`` section (``{task: {"metric,filter":
    value}}``) as ``<task>/<metric>``, or ``<task>/<metric>/<filter>`` for a filter other than
    ``none``; strings such as ``"N/A"`` are left out, non-finite values too (with a warning).
    Raises ``ValueError`` when two keys would share a name."""
    out: dict[str, float] = {}
    origin: dict[str, str] = {}
    for task, values in results.items():
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if not math.isfinite(value):
                log.warning("lmms-eval reported %s %s = %s: not logged", task, key, value)
                continue
            metric, _, filt = key.partition(",")
            name = metric_name(task, metric, *([filt] if filt not in ("", "none") else []))
            if name in out:
                raise ValueError(f"lmms-eval metrics {origin[name]!r} and {task}/{key!r} both become {name!r}")
            out[name], origin[name] = float(value), f"{task}/{key}"
    return out
