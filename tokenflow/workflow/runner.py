"""Plan and run the stage DAG: skip complete stages, run ready ones side by side when the
cluster has room, and record the lineage in MLflow (one parent run, one nested run per stage)."""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.redaction import redact
from tokenflow.stages.corpus import source_changes
from tokenflow.stages.stage_run import RunLink, StageIdentity
from tokenflow.stages.tracking import check_tracking, log_text_artifact, resolve_tracking_uri, start_stage_run
from tokenflow.workflow.durable import StageOutput
from tokenflow.workflow.eval_task import run_as_task
from tokenflow.workflow.identity import Environment, resolve, unmet_gpu_demand
from tokenflow.workflow.lease import new_owner, stage_lease
from tokenflow.workflow.pipeline import StageSpec, downstream, resources, stages

log = logging.getLogger(__name__)

PIPELINE_STAGE = "pipeline"


class PlanError(ValueError):
    """A partial run whose inputs are not complete."""


@dataclass(frozen=True)
class PlannedStage:
    spec: StageSpec
    identity: StageIdentity | None  # None: pending, an input is not complete yet
    output: StageOutput | None
    cached: bool
    selected: bool  # part of this invocation (--only / --from)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def status(self) -> str:
        if self.cached:
            return "cached"
        if not self.selected:
            return "skipped"
        return "run" if self.identity is not None else "pending"


def _resolved(spec: StageSpec, cfg: TokenFlowConfig, data: dict[str, Any], storage_root: str,
              complete: dict[str, StageOutput], env: Environment, selected: bool) -> PlannedStage:
    identity = resolve(spec, cfg, data, complete, env)
    output = StageOutput.under(storage_root, spec.name, identity.hash)
    return PlannedStage(spec, identity, output, output.complete(), selected)


def plan(cfg: TokenFlowConfig, storage_root: str, only: str | None = None, start: str | None = None,
         env: Environment | None = None) -> list[PlannedStage]:
    """Every stage in DAG order with its state: ``cached`` (complete), ``run`` (identity known),
    ``pending`` (runs, identity known once its inputs are complete) or ``skipped``."""
    specs = stages(cfg)
    names = [s.name for s in specs]
    if not {only, start} - {None} <= set(names):
        raise PlanError(f"this config has no stage {only or start!r}; its stages: {', '.join(names)}")
    selected = {only} if only else downstream(specs, {start}) if start else set(names)
    try:
        check_tracking(cfg.tracking, storage_root)
    except ValueError as exc:
        raise PlanError(str(exc)) from exc
    env = env or Environment.detect(all_libraries(specs))
    unmet = [reason for spec in specs if spec.name in selected
             if (reason := unmet_gpu_demand(spec, cfg, env)) is not None]
    if unmet:
        raise PlanError("; ".join(dict.fromkeys(unmet)) + " (set it to auto or false/0, or run on a cluster with "
                        "GPUs)")
    data = cfg.model_dump(mode="json")
    complete: dict[str, StageOutput] = {}
    out = []
    for spec in specs:
        if all(name in complete for name in spec.inputs):
            planned = _resolved(spec, cfg, data, storage_root, complete, env, spec.name in selected)
            if planned.cached:
                complete[spec.name] = planned.output
        else:
            planned = PlannedStage(spec, None, None, False, spec.name in selected)
        out.append(planned)
    for p in out:
        kind, _, name = p.name.partition(".")
        c = cfg.corpora.get(name) if kind == "corpus" else None
        if c is not None and p.selected and not p.cached and c.source == "url" and c.on_source_change == "fail":
            if changes := source_changes(storage.join(storage_root, p.name), c):
                raise PlanError(f"corpus {name!r} changed ({changes}) and corpora.{name}.on_source_change is fail; "
                                "set it to recompute to re-index it and run everything after it again")
    for p in out:
        if p.selected and not p.cached:
            missing = [i for i in p.spec.inputs if i not in complete and i not in selected]
            if missing:
                raise PlanError(f"{p.name} needs {', '.join(missing)}, which this partial run does not "
                                "include and which are not complete; run them first")
    return out


def all_libraries(specs: tuple[StageSpec, ...]) -> tuple[str, ...]:
    return tuple(sorted({name for spec in specs for name in spec.libraries}))


def describe(stages: list[PlannedStage]) -> str:
    """The plan as a table (for --dry-run and the log)."""
    rows = [f"{'stage':<24}{'hash':<14}{'status':<9}output"]
    for p in stages:
        where = p.output.url if p.output else "(identity known once its inputs are complete)"
        rows.append(f"{p.name:<24}{p.output.hash[:12] if p.output else '-':<14}{p.status:<9}{where}")
    return "\n".join(rows)


class Lineage:
    """The pipeline's parent MLflow run: the plan, the resolved config, the overrides and package
    versions, every stage's state and the evaluations' summary. Each stage owns its nested run
    (tokenflow.stages.stage_run). An invocation with nothing to run is named and described as
    cached, and links the runs it reused."""

    def __init__(self, cfg: TokenFlowConfig, storage_root: str, stages: list[PlannedStage], config_path: str,
                 overrides: list[str]):
        import mlflow

        self.name = Path(config_path).stem
        reused = {p.name: p.output.manifest().get("mlflow_run_id") for p in stages if p.cached}
        cached = all(p.cached or not p.selected for p in stages)
        tracking_uri, self.run_id, _ = start_stage_run(
            cfg, PIPELINE_STAGE, cfg.model_dump(mode="json"), storage_root, {}, None, reuse_unfinished=False,
            run_name=f"{self.name} pipeline" + (" (cached)" if cached else ""))
        self.client = mlflow.MlflowClient(tracking_uri)
        self.client.set_tag(self.run_id, "tokenflow.config_file", redact(config_path))
        self.client.set_tag(self.run_id, "tokenflow.cached", str(cached).lower())
        for name, run_id in reused.items():
            if run_id:
                self.client.set_tag(self.run_id, f"tokenflow.reused.{name}.run_id", run_id)
        note = (f"The {self.name} pipeline ({config_path}) under {storage_root}: "
                f"{sum(p.selected and not p.cached for p in stages)} stages to run, {len(reused)} cached.")
        if cached:
            note = (f"Nothing ran: every stage of the {self.name} pipeline was already complete under "
                    f"{storage_root}. The runs that made them are tagged tokenflow.reused.<stage>.run_id.")
        self.client.set_tag(self.run_id, "mlflow.note.content", redact(note))
        for p in stages:
            self.stage_state(p)
        self._log_json({"stages": [{"name": p.name, "status": p.status, "inputs": list(p.spec.inputs),
                                    "identity": asdict(p.identity) if p.identity else None,
                                    "output": p.output.url if p.output else None} for p in stages]},
                       "plan.json")
        self._log_json(cfg.model_dump(mode="json"), "resolved_config.json")
        self._log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "resolved_config.yaml")
        self._log_text("".join(f"{o}\n" for o in overrides), "overrides.txt")
        self._log_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in sorted(
            metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())), "packages.txt")

    def _log_text(self, text: str, name: str) -> None:
        log_text_artifact(self.client, self.run_id, text, name)

    def _log_json(self, value: Any, name: str) -> None:
        self._log_text(json.dumps(value, indent=2, sort_keys=True), name)

    def stage_state(self, p: PlannedStage, status: str | None = None) -> None:
        """Tag the parent run with a stage's identity and state."""
        self.client.set_tag(self.run_id, f"tokenflow.stage.{p.name}",
                            f"{p.output.hash[:12] if p.output else '-'} {status or p.status}")

    def link(self, p: PlannedStage, inputs: dict[str, StageOutput]) -> RunLink:
        return RunLink(self.run_id, p.identity, {name: out.url for name, out in inputs.items()}, self.name)

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


def _run_leased(p: PlannedStage, cfg: TokenFlowConfig, inputs: dict[str, StageOutput], link: RunLink,
                owner: str, need: dict[str, float]) -> tuple[dict[str, Any], bool]:
    """Run a stage while holding its output's lease (an evaluation as a Ray task holding
    ``need``); (manifest, False) when another run on the same storage completed it while this
    one waited."""
    with stage_lease(p.output, owner, cfg.workflow, p.name) as must_run:
        if not must_run:
            return p.output.manifest(), False
        if p.spec.device == "eval":
            return run_as_task(p.name, p.spec.run, cfg, inputs, p.output.url, link, need), True
        return p.spec.run(cfg, inputs, p.output.url, link), True


def _fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) >= v for k, v in need.items())


def execute(cfg: TokenFlowConfig, storage_root: str, stages: list[PlannedStage], lineage: Lineage,
            env: Environment) -> dict[str, dict[str, Any]]:
    """Run the selected incomplete stages once their inputs are complete (a pending stage's
    identity is resolved then, and it is skipped if that output already exists); stages run side
    by side while the cluster's resources cover all of them (a stage that needs more than the
    cluster has runs alone). Each stage runs under its output's lease, so another run on the
    same storage waits for it and reuses it. Returns every complete stage's manifest."""
    import ray

    total = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    gpus = total.get("GPU", 0.0) > 0
    data = cfg.model_dump(mode="json")
    outputs = {p.name: p.output for p in stages if p.cached}
    manifests = {p.name: p.output.manifest() for p in stages if p.cached}
    pending = [p for p in stages if p.selected and not p.cached]
    owner = new_owner()
    running: dict[Future, PlannedStage] = {}
    free = dict(total)
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max(len(pending), 1)) as pool:
        while (pending and failure is None) or running:
            for p in list(pending):
                if failure is not None or not all(i in manifests for i in p.spec.inputs):
                    continue
                if p.identity is None:  # its inputs just completed
                    p = _resolved(p.spec, cfg, data, storage_root, outputs, env, True)
                    if p.cached:
                        pending = [q for q in pending if q.name != p.name]
                        outputs[p.name], manifests[p.name] = p.output, p.output.manifest()
                        lineage.stage_state(p)
                        log.info("stage %s (%s): cached (its re-run inputs came out the same)", p.name,
                                 p.output.hash[:12])
                        continue
                need = {k: min(v, total.get(k, 0.0)) for k, v in resources(cfg, p.name, gpus).items()}
                if running and not _fits(need, free):
                    continue
                for k, v in need.items():
                    free[k] = free.get(k, 0.0) - v
                pending = [q for q in pending if q.name != p.name]
                lineage.stage_state(p, "running")
                log.info("stage %s (%s): starting", p.name, p.output.hash[:12])
                inputs = {i: outputs[i] for i in p.spec.inputs}
                running[pool.submit(_run_leased, p, cfg, inputs, lineage.link(p, inputs), owner, need)] = p
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                p = running.pop(future)
                for k, v in resources(cfg, p.name, gpus).items():
                    free[k] = free.get(k, 0.0) + min(v, total.get(k, 0.0))
                try:
                    manifests[p.name], ran = future.result()
                    outputs[p.name] = p.output
                    lineage.stage_state(p, "complete" if ran else "cached")
                    log.info("stage %s: %s", p.name, "complete" if ran else
                             "cached (another run on this storage made it while this one waited)")
                except BaseException as exc:  # noqa: BLE001 - reported after running stages finish
                    lineage.stage_state(p, "failed")
                    log.error("stage %s failed: %s", p.name, exc)
                    failure = failure or exc
    if failure is not None:
        raise failure
    return manifests


def run_pipeline(cfg: TokenFlowConfig, storage_root: str, config_path: str, only: str | None = None,
                 start: str | None = None, overrides: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Plan, open the parent run, execute, log the summary; returns the manifests."""
    env = Environment.detect(all_libraries(stages(cfg)))
    planned = plan(cfg, storage_root, only, start, env)
    log.info("plan:\n%s", describe(planned))
    # One tracking store for every stage (and the Ray workers they start).
    os.environ["MLFLOW_TRACKING_URI"] = resolve_tracking_uri(cfg.tracking, storage_root)
    lineage = Lineage(cfg, storage_root, planned, config_path, overrides or [])
    try:
        manifests = execute(cfg, storage_root, planned, lineage, env)
    except BaseException:
        lineage.finish("FAILED")
        raise
    lineage.summary(manifests)
    lineage.finish("FINISHED")
    return manifests
