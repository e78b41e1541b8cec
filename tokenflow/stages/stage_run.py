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
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig, canonical_json
from tokenflow.data.manifest import LEASE_NAME, MANIFEST_NAME, content_digest
from tokenflow.monitoring import system_metrics
from tokenflow.redaction import redact
from tokenflow.stages.registry import register_export
from tokenflow.stages.tracking import log_text_artifact, start_stage_run
from tokenflow.stages.training import CHECKPOINTS_DIR

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
    """Where a stage's run hangs: the pipeline's parent run and config name, the planner's
    identity for it, and the upstream outputs it reads (``{stage: url}``). Empty when a stage
    runs on its own."""

    parent_run_id: str | None = None
    identity: StageIdentity | None = None
    upstream: dict[str, str] = field(default_factory=dict)
    pipeline: str | None = None  # the pipeline config's name (e.g. "smoke")

    def run_name(self, stage: str) -> str:
        """``<pipeline>/<stage>@<hash8>`` when linked, else the stage name."""
        if self.identity is None:
            return stage
        return f"{self.pipeline or 'pipeline'}/{stage}@{self.identity.hash[:8]}"


class StageRun:
    """A stage's MLflow run and its manifest (see the module docstring)."""

    def __init__(self, cfg: TokenFlowConfig, stage: str, sections: set[str], out_url: str,
                 inputs: dict[str, str], link: RunLink | None = None, description: str = ""):
        self.cfg, self.stage, self.sections, self.out_url = cfg, stage, sections, out_url
        self.inputs = inputs
        self.link = link or RunLink()
        self.description = description
        self.finished = False
        self._monitor = ExitStack()

    @property
    def context(self) -> str:
        """The MLflow dataset context of what this stage reads."""
        return "evaluation" if self.stage.startswith("eval_") else "training"

    def __enter__(self) -> "StageRun":
        import mlflow

        # The config the stage depends on: its identity's part when the pipeline planned it,
        # else its sections. Params, the config_hash tag and the manifest all carry its hash.
        identity = self.link.identity
        config = identity.config if identity is not None else self.cfg.model_dump(mode="json", include=self.sections)
        self.tracking_uri, self.run_id, params = start_stage_run(
            self.cfg, self.stage, config, self.out_url, self.inputs, self.link.parent_run_id,
            run_name=self.link.run_name(self.stage))
        self.client = mlflow.MlflowClient(self.tracking_uri)
        self.config_hash = params["config_hash"]
        self.git_commit = params["git_commit"]
        self.started = time.perf_counter()
        self._note()
        self._record_link()
        interval = self.cfg.tracking.system_metrics_every_s
        if self.stage.startswith("eval_") and interval:  # evaluations compute here, in their Ray task
            self._monitor.enter_context(system_metrics(self.run_id, self.tracking_uri, interval, "eval"))
        return self

    def _note(self, headline: str = "") -> None:
        """The run's description (MLflow's note): what the stage does, its headline, its output."""
        parts = [self.description, headline, f"Output: {self.out_url}"]
        self.tag("mlflow.note.content", "\n\n".join(p for p in parts if p))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._monitor.close()
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
        for name, url in sorted(self.link.upstream.items()):
            manifest = storage.read_json(storage.join(url, MANIFEST_NAME))
            self.log_json(manifest, f"{name}_MANIFEST.json", "inputs")
            if manifest.get("mlflow_run_id"):  # the run that made this input
                self.tag(f"tokenflow.upstream.{name}.run_id", manifest["mlflow_run_id"])
            if manifest.get("kind") in DATASET_KINDS:
                self.log_dataset(name, content_digest(manifest), url)

    def log_dataset(self, name: str, digest: str, source: str) -> None:
        """Record a dataset this stage reads (context: training, or evaluation for eval_*)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.client.log_inputs(self.run_id, datasets=[DatasetInput(
            Dataset(name=name, digest=digest[:12], source_type="tokenflow", source=redact(source), schema=None,
                    profile=None),
            tags=[InputTag("mlflow.data.context", self.context)])])

    def artifact(self, path: Path, directory: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), directory)

    def log_json(self, value: Any, name: str, directory: str | None = None) -> None:
        log_text_artifact(self.client, self.run_id, json.dumps(value, indent=2, sort_keys=True), name, directory)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, redact(value))

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in sorted(values.items())])

    def register_model(self, source_url: str, weights_path: str, sha256: str) -> None:
        """Publish this stage's export (``source_url``; its weights file ``weights_path`` inside
        it, "" when it is that file, of sha256 ``sha256``) in the Model Registry under the
        configured name, if any."""
        name = self.cfg.tracking.registered_models.get(self.stage)
        if not name:
            return
        tags = {"tokenflow.config_hash": self.config_hash, "tokenflow.git_commit": self.git_commit,
                "tokenflow.input_digests": canonical_json(self.inputs)}
        if self.link.identity is not None:
            tags["tokenflow.stage_hash"] = self.link.identity.hash
        version = register_export(self.client, name, self.cfg.tracking.registry_alias, self.stage, self.run_id,
                                  source_url, weights_path, sha256, tags)
        self.tag("tokenflow.registered_model", f"{name}/{version}")
        log.info("%s: registered %s version %s (alias %s)", self.stage, name, version, self.cfg.tracking.registry_alias)

    def finish(self, manifest: dict[str, Any], headline: str = "") -> dict[str, Any]:
        """Complete ``manifest`` (the stage's inputs, config hash and run id), write it last, and
        close the run FINISHED (its description gains ``headline``); returns it."""
        if headline:
            self._note(headline)
        manifest = {**manifest, "inputs": self.inputs, "config_hash": self.config_hash, "mlflow_run_id": self.run_id,
                    "files": storage.file_sizes(self.out_url, exclude=(MANIFEST_NAME, LEASE_NAME, LEASE_NAME + ".lock",
                                                                       CHECKPOINTS_DIR))}
        storage.write_json_atomic(storage.join(self.out_url, MANIFEST_NAME), manifest)
        self.log_json(manifest, MANIFEST_NAME, "output")
        self.metrics({"stage_seconds": time.perf_counter() - self.started})
        self._monitor.close()
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True
        return manifest
