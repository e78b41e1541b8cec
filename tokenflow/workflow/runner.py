"""Plan and run the stage DAG: skip complete stages, run ready ones side by side when the
cluster has room, and record the lineage in MLflow (one parent run, one nested run per stage)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenflow.config import TokenFlowConfig, canonical_json, config_hash
from tokenflow.workflow.durable import StageOutput, code_version, config_subset, stage_hash
from tokenflow.workflow.pipeline import StageSpec, downstream, resources, stages
from tokenflow.workflow.tracking import git_commit, resolve_tracking_uri, start_stage_run

log = logging.getLogger(__name__)

PIPELINE_STAGE = "pipeline"


class PlanError(ValueError):
    """A partial run whose inputs are not complete."""


@dataclass(frozen=True)
class PlannedStage:
    spec: StageSpec
    output: StageOutput
    config: dict[str, Any]
    input_hashes: dict[str, str]
    cached: bool
    selected: bool  # part of this invocation (--only / --from)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def status(self) -> str:
        if self.cached:
            return "cached"
        return "run" if self.selected else "skipped"


def plan(cfg: TokenFlowConfig, storage_root: str, only: str | None = None, start: str | None = None) -> list[PlannedStage]:
    """Every stage with its identity, output location and state, in DAG order."""
    data = cfg.model_dump(mode="json")
    specs = stages(cfg)
    names = [s.name for s in specs]
    if not {only, start} - {None} <= set(names):
        raise PlanError(f"this config has no stage {only or start!r}; its stages: {', '.join(names)}")
    selected = {only} if only else downstream(specs, {start}) if start else set(names)
    code = code_version()
    hashes: dict[str, str] = {}
    out = []
    for spec in specs:
        subset = config_subset(data, spec.config)
        inputs = {name: hashes[name] for name in spec.inputs}
        hashes[spec.name] = stage_hash(spec.name, subset, inputs, code)
        output = StageOutput.under(storage_root, spec.name, hashes[spec.name])
        out.append(PlannedStage(spec, output, subset, inputs, output.complete(), spec.name in selected))
    done = {p.name for p in out if p.cached}
    for p in out:
        if p.selected and not p.cached:
            missing = [i for i in p.spec.inputs if i not in done and i not in selected]
            if missing:
                raise PlanError(f"{p.name} needs {', '.join(missing)}, which this partial run does not "
                                "include and which are not complete; run them first")
    return out


def describe(stages: list[PlannedStage]) -> str:
    """The plan as a table (for --dry-run and the log)."""
    rows = [f"{'stage':<24}{'hash':<14}{'status':<9}output"]
    rows += [f"{p.name:<24}{p.output.hash[:12]:<14}{p.status:<9}{p.output.url}" for p in stages]
    return "\n".join(rows)


class Lineage:
    """The pipeline's parent MLflow run and what the driver records on each stage's run."""

    def __init__(self, cfg: TokenFlowConfig, storage_root: str, stages: list[PlannedStage], config_path: str):
        import mlflow

        self.cfg = cfg
        tracking_uri, self.run_id, _ = start_stage_run(cfg, PIPELINE_STAGE, set(type(cfg).model_fields), storage_root,
                                                       {}, None, reuse_unfinished=False)
        self.client = mlflow.MlflowClient(tracking_uri)
        self.client.set_tag(self.run_id, "tokenflow.code_version", code_version())
        self.client.set_tag(self.run_id, "tokenflow.config_file", config_path)
        for p in stages:
            self.client.set_tag(self.run_id, f"tokenflow.stage.{p.name}", f"{p.output.hash[:12]} {p.status}")
        self._log_json({"stages": [{"name": p.name, "hash": p.output.hash, "status": p.status,
                                    "output": p.output.url, "inputs": p.input_hashes} for p in stages]},
                       "plan.json", "")
        self._log_json(cfg.model_dump(mode="json"), "resolved_config.json", "")

    def _log_json(self, value: Any, name: str, artifact_dir: str, run_id: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(value, indent=2, sort_keys=True))
            self.client.log_artifact(run_id or self.run_id, str(path), artifact_dir or None)

    def open_stage_run(self, p: PlannedStage) -> str:
        """A nested run for a stage that does not track itself."""
        _, run_id, _ = start_stage_run(self.cfg, p.name, set(), p.output.url, p.input_hashes, self.run_id)
        return run_id

    def record_stage(self, p: PlannedStage, manifest: dict[str, Any], inputs: dict[str, StageOutput],
                     run_id: str) -> None:
        """Tag the stage's run with its identity, log its config subset, input and output manifests."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        self.client.set_tag(run_id, "tokenflow.stage_hash", p.output.hash)
        self.client.set_tag(run_id, "tokenflow.input_hashes", canonical_json(p.input_hashes))
        self.client.set_tag(run_id, "tokenflow.code_version", code_version())
        self.client.set_tag(run_id, "tokenflow.git_commit", git_commit())
        self.client.set_tag(run_id, "tokenflow.stage_config_hash", config_hash(p.config))
        self._log_json(p.config, "stage_config.json", "", run_id)
        self._log_json(manifest, "_MANIFEST.json", "output", run_id)
        datasets = []
        for name, upstream in inputs.items():
            upstream_manifest = upstream.manifest()
            self._log_json(upstream_manifest, f"{name}_MANIFEST.json", "inputs", run_id)
            if upstream_manifest.get("kind") in ("corpus", "token_shards") or name in ("corpus", "pretokenize"):
                datasets.append(DatasetInput(Dataset(name=name, digest=upstream.hash[:12], source_type="tokenflow",
                                                     source=upstream.url, schema=None, profile=None),
                                             tags=[InputTag("mlflow.data.context", "training")]))
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)

    def summary(self, manifests: dict[str, dict[str, Any]]) -> None:
        """Every evaluation's metrics on the parent run (``<stage>/<metric>``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{name}/{key}", float(value), now, 0)
                   for name, manifest in sorted(manifests.items()) if name.startswith("eval_")
                   for key, value in sorted(manifest.get("metrics", {}).items())
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v for k, v in need.items())


def execute(cfg: TokenFlowConfig, stages: list[PlannedStage], lineage: Lineage) -> dict[str, dict[str, Any]]:
    """Run the selected incomplete stages once their inputs are complete; stages run side by side
    while the cluster's resources cover all of them (a stage that needs more than the cluster
    has runs alone). Returns every complete stage's manifest."""
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    outputs = {p.name: p.output for p in stages}
    manifests = {p.name: p.output.manifest() for p in stages if p.cached}
    pending = [p for p in stages if p.selected and not p.cached]
    running: dict[Future, PlannedStage] = {}
    free = dict(total)
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(len(pending), 1)) as pool:
        while (pending and failure is None) or running:
            for p in list(pending):
                if failure is not None or not all(i in manifests for i in p.spec.inputs):
                    continue
                need = {k: min(v, total.get(k, 0.0)) for k, v in resources(cfg, p.name).items()}
                if running and not _fits(need, free):
                    continue
                for k, v in need.items():
                    free[k] = free.get(k, 0.0) - v
                pending.remove(p)
                log.info("stage %s (%s): starting", p.name, p.output.hash[:12])
                running[pool.submit(_run_stage, cfg, p, {i: outputs[i] for i in p.spec.inputs},
                                    lineage)] = p
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                p = running.pop(future)
                for k, v in resources(cfg, p.name).items():
                    free[k] = free.get(k, 0.0) + min(v, total.get(k, 0.0))
                try:
                    manifests[p.name] = future.result()
                    log.info("stage %s: complete", p.name)
                except BaseException as exc:  # noqa: BLE001 - reported after running stages finish
                    log.error("stage %s failed: %s", p.name, exc)
                    failure = failure or exc
    if failure is not None:
        raise failure
    return manifests


def _run_stage(cfg: TokenFlowConfig, p: PlannedStage, inputs: dict[str, StageOutput], lineage: Lineage) -> dict[str, Any]:
    own_run = None if p.spec.tracks_itself else lineage.open_stage_run(p)
    t0 = time.perf_counter()
    manifest = p.spec.run(cfg, inputs, p.output.url, lineage.run_id)
    run_id = manifest.get("mlflow_run_id") or own_run
    if run_id:
        lineage.record_stage(p, manifest, inputs, run_id)
        lineage.client.log_metric(run_id, "stage_seconds", time.perf_counter() - t0)
        if own_run:
            lineage.client.set_terminated(own_run, "FINISHED")
    return manifest


def run_pipeline(cfg: TokenFlowConfig, storage_root: str, config_path: str, only: str | None = None,
                 start: str | None = None) -> dict[str, dict[str, Any]]:
    """Plan, open the parent run, execute, log the summary; returns the manifests."""
    import os

    stages = plan(cfg, storage_root, only, start)
    log.info("plan:\n%s", describe(stages))
    # One tracking store for every stage (and the Ray workers they start).
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(cfg.tracking, storage_root)
    lineage = Lineage(cfg, storage_root, stages, config_path)
    try:
        manifests = execute(cfg, stages, lineage)
    except BaseException:
        lineage.finish("FAILED")
        raise
    lineage.summary(manifests)
    lineage.finish("FINISHED")
    return manifests
