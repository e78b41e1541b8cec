"""A stage's identity: the cache key that covers everything that changes its result, and nothing
else.

    config      the dotted config paths the stage reads, minus those that only change logging
                or inference (``StageSpec.exclude``)
    inputs      the content digest of each upstream output (its manifest without the run's
                bookkeeping), and for an indexed corpus its shards' sizes and versions
    code        the sources of the project modules the stage's module imports, transitively
                (docs, benchmarks and modules it never imports do not count)
    deepspeed   the resolved DeepSpeed config of a training stage
    libraries   the versions of the libraries that change its numerics
    device      where it computes (cpu or cuda), resolved against the cluster

An input's digest is known once that input is complete, so a stage downstream of one that still
has to run is resolved when it is about to start (and is found complete if the re-run upstream
made the same output).
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from tokenflow.config import TokenFlowConfig, canonical_json, load_deepspeed_config
from tokenflow.data.manifest import content_digest
from tokenflow.stages.stage_run import StageIdentity
from tokenflow.workflow.durable import StageOutput, config_subset
from tokenflow.workflow.pipeline import StageSpec

PACKAGE = Path(__file__).resolve().parents[1]


def _distribution_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


@dataclass(frozen=True)
class Environment:
    """What besides the config and the inputs decides a stage's result, as this invocation sees it."""

    cluster_gpus: bool  # the Ray cluster's workers have GPUs (training, pretokenize, evaluation tasks)
    libraries: dict[str, str] = field(default_factory=dict)  # distribution -> version
    package: Path = PACKAGE  # the tokenflow package whose sources are hashed

    @classmethod
    def detect(cls, libraries: tuple[str, ...]) -> "Environment":
        """The connected Ray cluster's GPUs (else this machine's) and the installed versions."""
        import ray
        import torch

        cluster = ray.cluster_resources().get("GPU", 0) > 0 if ray.is_initialized() else torch.cuda.is_available()
        return cls(cluster, {name: _distribution_version(name) for name in libraries})


def _module_path(package: Path, module: str) -> Path | None:
    parts = module.split(".")[1:]
    base = package.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(package: Path, path: Path) -> set[str]:
    """The project modules a source file imports anywhere (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == package.name and _module_path(package, name) is not None:
                out.add(name)
    return out


def _source_state(package: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime, size) of every source file: what invalidates the caches below."""
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(package.rglob("*.py")))


def project_modules(module: str, package: Path = PACKAGE) -> tuple[str, ...]:
    """``module`` and every project module it imports, transitively, with their packages."""
    return _closure(module, package, _source_state(package))


def code_digest(module: str, package: Path = PACKAGE) -> str:
    """sha256 over the sources (name and bytes) of :func:`project_modules`."""
    return _digest(module, package, _source_state(package))


@lru_cache(maxsize=64)
def _closure(module: str, package: Path, state: tuple) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            parent = ".".join(parts[:i])
            if parent in seen:
                continue
            path = _module_path(package, parent)
            if path is None:
                continue
            seen.add(parent)
            todo.extend(_imported(package, path) - seen)
    return tuple(sorted(seen))


@lru_cache(maxsize=64)
def _digest(module: str, package: Path, state: tuple) -> str:
    digest = hashlib.sha256()
    for name in _closure(module, package, state):
        digest.update(name.encode() + b"\0" + _module_path(package, name).read_bytes() + b"\0")
    return digest.hexdigest()


def _device(spec: StageSpec, cfg: TokenFlowConfig, env: Environment) -> str:
    if spec.device == "eval":
        return "cuda" if cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and env.cluster_gpus) else "cpu"
    if spec.device == "pretokenize":
        gpus = cfg.pretokenize.gpus_per_actor
        return "cuda" if (gpus == "auto" and env.cluster_gpus) or (gpus != "auto" and gpus > 0) else "cpu"
    if spec.training_section is not None:
        use_gpu = getattr(cfg, spec.training_section).use_gpu
        return "cuda" if (use_gpu == "auto" and env.cluster_gpus) or use_gpu is True else "cpu"
    return "cpu"


def unmet_gpu_demand(spec: StageSpec, cfg: TokenFlowConfig, env: Environment) -> str | None:
    """Why ``spec`` cannot run as configured here: it asks for GPUs explicitly (not ``auto``) and
    the place it would run has none; else None. Checked before any stage starts, so a GPU config
    never trains on CPUs under the GPU run's cache key."""
    if spec.device == "eval":
        if cfg.eval.device == "cuda" and not env.cluster_gpus:
            return "eval.device is cuda but the Ray cluster has no GPUs"
    elif spec.device == "pretokenize":
        gpus = cfg.pretokenize.gpus_per_actor
        if gpus != "auto" and gpus > 0 and not env.cluster_gpus:
            return f"pretokenize.gpus_per_actor is {gpus} but the Ray cluster has no GPUs"
    elif spec.training_section is not None and getattr(cfg, spec.training_section).use_gpu is True \
            and not env.cluster_gpus:
        return f"{spec.training_section}.use_gpu is true but the Ray cluster has no GPUs"
    return None


def resolve(spec: StageSpec, cfg: TokenFlowConfig, data: dict[str, Any], upstream: dict[str, StageOutput],
            env: Environment) -> StageIdentity:
    """The identity of ``spec`` once every input in ``upstream`` is complete."""
    inputs = {name: content_digest(upstream[name].manifest()) for name in spec.inputs}
    if spec.sources is not None:
        inputs.update(spec.sources(cfg))
    modules = project_modules(spec.module, env.package)
    deepspeed = None
    if spec.training_section is not None:
        section = getattr(cfg, spec.training_section)
        deepspeed = hashlib.sha256(canonical_json(load_deepspeed_config(section.deepspeed)).encode()).hexdigest()
    fields = {"stage": spec.name, "config": config_subset(data, spec.config, spec.exclude), "inputs": inputs,
              "code": code_digest(spec.module, env.package), "deepspeed": deepspeed,
              "libraries": {name: env.libraries.get(name, "absent") for name in spec.libraries},
              "device": _device(spec, cfg, env)}
    identity = hashlib.sha256(canonical_json(fields).encode()).hexdigest()
    return StageIdentity(hash=identity, config=fields["config"], inputs=inputs, code=fields["code"],
                         modules=modules, deepspeed=deepspeed, libraries=fields["libraries"], device=fields["device"])
