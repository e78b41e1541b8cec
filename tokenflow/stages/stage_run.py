"""The one way a stage owns its MLflow run and its completion.

Every stage opens a :class:`StageRun` around its work::

    with StageRun(cfg, "train_tokenizer", {"tokenizer", "train_tokenizer"}, out_url, inputs, link) as run:
        ...                                    # run.run_id / run.tracking_uri go to the workers
        return run.finish(manifest)            # manifest written last, run FINISHED

Entering opens the stage's run (or reopens the unfinished one of the same output, so a resumed
stage keeps logging into it), nested under the pipeline's run when the driver links one, and
records the identity the planner gave the stage and the upstream manifests it reads.
``finish`` writes ``_MANIFEST.json`` last (with the stage's inputs, config hash and run id),
logs it and the stage's duration, and closes the run; leaving the block without finishing (an
exception) closes the run FAILED.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig, canonical_json
from tokenflow.data.manifest import MANIFEST_NAME, content_digest
from tokenflow.stages.tracking import start_stage_run

log = logging.getLogger(__name__)

DATASET_KINDS = ("corpus", "token_shards")  # upstream outputs logged as MLflow dataset inputs


@dataclass(frozen=True)
class StageIdentity:
    """Everything a stage's cache key covers (see tokenflow.workflow.identity), as recorded."""

    hash: str
    config: dict[str, Any]  # dotted config path -> value
    inputs: dict[str, str]  # upstream stage -> its content digest
    code: str  # digest of the project modules the stage imports
    modules: tuple[str, ...]
    deepspeed: str | None  # digest of the resolved DeepSpeed config (training stages)
    libraries: dict[str, str]  # distribution -> version
    device: str


@dataclass(frozen=True)
class RunLink:
    """Where a stage's run hangs: the pipeline's parent run, the planner's identity for it, and
    the upstream outputs it reads (``{stage: url}``). Empty when a stage runs on its own."""

    parent_run_id: str | None = None
    identity: StageIdentity | None = None
    upstream: dict[str, str] = field(default_factory=dict)


class StageRun:
    """A stage's MLflow run and its manifest (see the module docstring)."""

    def __init__(self, cfg: TokenFlowConfig, stage: str, sections: set[str], out_url: str,
                 inputs: dict[str, str], link: RunLink | None = None):
        self.cfg, self.stage, self.sections, self.out_url = cfg, stage, sections, out_url
        self.inputs = inputs
        self.link = link or RunLink()
        self.finished = False

    def __enter__(self) -> "StageRun":
        import mlflow

        self.tracking_uri, self.run_id, params = start_stage_run(
            self.cfg, self.stage, self.sections, self.out_url, self.inputs, self.link.parent_run_id)
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.config_hash = params["config_hash"]
        self.started = time.perf_counter()
        self._record_link()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.finished:
            self.client.set_terminated(self.run_id, "FAILED")

    def _record_link(self) -> None:
        identity = self.link.identity
        if identity is not None:
            self.client.set_tag(self.run_id, "tokenflow.stage_hash", identity.hash)
            self.client.set_tag(self.run_id, "tokenflow.code_digest", identity.code)
            self.client.set_tag(self.run_id, "tokenflow.device", identity.device)
            self.client.set_tag(self.run_id, "tokenflow.input_digests", canonical_json(identity.inputs))
            self.log_json(identity.config, "stage_config.json")
            self.log_json(asdict(identity), "stage_identity.json")
        datasets = []
        for name, url in sorted(self.link.upstream.items()):
            manifest = storage.read_json(storage.join(url, MANIFEST_NAME))
            self.log_json(manifest, f"{name}_MANIFEST.json", "inputs")
            if manifest.get("kind") in DATASET_KINDS:
                datasets.append((name, url, manifest))
        if datasets:
            from mlflow.entities import Dataset, DatasetInput, InputTag

            self.client.log_inputs(self.run_id, datasets=[
                DatasetInput(Dataset(name=name, digest=content_digest(manifest)[:12],
                                     source_type="tokenflow", source=url, schema=None, profile=None),
                             tags=[InputTag("mlflow.data.context", "training")])
                for name, url, manifest in datasets])

    def artifact(self, path: Path, directory: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), directory)

    def log_json(self, value: Any, name: str, directory: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(value, indent=2, sort_keys=True))
            self.artifact(path, directory)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(values.items())])

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Complete ``manifest`` (the stage's inputs, config hash and run id), write it last, and
        close the run FINISHED; returns it."""
        manifest = {**manifest, "inputs": self.inputs, "config_hash": self.config_hash, "mlflow_run_id": self.run_id}
        storage.write_json_atomic(storage.join(self.out_url, MANIFEST_NAME), manifest)
        self.log_json(manifest, MANIFEST_NAME, "output")
        self.metrics({"stage_seconds": time.perf_counter() - self.started})
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True
        return manifest
