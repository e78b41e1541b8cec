"""The stage DAG of ``pipelines/full.py``: what each stage reads, needs and runs.

    corpus ──► train_tokenizer ──► eval_reconstruction
       │              │
       └────────► pretokenize ──► train_generator ──► eval_generation
                                 └► train_understanding ──► eval_understanding
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.workflow.durable import StageOutput

Inputs = dict[str, StageOutput]
Runner = Callable[[TokenFlowConfig, Inputs, str, str | None], dict[str, Any]]


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]  # upstream stage names
    config: tuple[str, ...]  # dotted config paths the stage reads (its identity)
    run: Runner  # (config, upstream outputs, output URL, parent MLflow run id) -> manifest
    tracks_itself: bool = True  # opens its own MLflow run (else the driver opens one)


def _manifest(inputs: Inputs, name: str) -> dict[str, Any]:
    return inputs[name].manifest()


def _tokenizer_url(inputs: Inputs) -> str:
    return storage.join(inputs["train_tokenizer"].url, _manifest(inputs, "train_tokenizer")["tokenizer"]["path"])


def _model_dir(inputs: Inputs, stage: str) -> str:
    return storage.join(inputs[stage].url, _manifest(inputs, stage)["model"]["path"].rsplit("/", 1)[0])


def _corpus(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.corpus import build_corpus

    return build_corpus(cfg.corpus, out)


def _train_tokenizer(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.train_tokenizer import run_train_tokenizer

    return run_train_tokenizer(cfg, _manifest(inputs, "corpus"), out, parent)


def _pretokenize(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.pretokenize import run_pretokenize

    return run_pretokenize(_manifest(inputs, "corpus"), _tokenizer_url(inputs), out, cfg.pretokenize)


def _train_generator(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.train_generator import run_train_generator

    return run_train_generator(cfg, _manifest(inputs, "pretokenize"), inputs["pretokenize"].url,
                               _tokenizer_url(inputs), out, parent)


def _train_understanding(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.train_understanding import run_train_understanding

    return run_train_understanding(cfg, _manifest(inputs, "pretokenize"), inputs["pretokenize"].url,
                                   _tokenizer_url(inputs), out, parent)


def _eval_reconstruction(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.evaluate import run_eval_reconstruction

    return run_eval_reconstruction(cfg, _manifest(inputs, "corpus"), _tokenizer_url(inputs), out, parent)


def _eval_generation(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.evaluate import run_eval_generation

    return run_eval_generation(cfg, _manifest(inputs, "corpus"), _model_dir(inputs, "train_generator"),
                               _tokenizer_url(inputs), out, parent)


def _eval_understanding(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.evaluate import run_eval_understanding

    return run_eval_understanding(cfg, _manifest(inputs, "corpus"), _model_dir(inputs, "train_understanding"),
                                  _tokenizer_url(inputs), out, parent)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("corpus", (), ("corpus",), _corpus, tracks_itself=False),
    StageSpec("train_tokenizer", ("corpus",), ("tokenizer", "train_tokenizer"), _train_tokenizer),
    StageSpec("eval_reconstruction", ("corpus", "train_tokenizer"), ("eval.reconstruction", "eval.seed", "eval.device"),
              _eval_reconstruction),
    StageSpec("pretokenize", ("corpus", "train_tokenizer"), ("pretokenize",), _pretokenize, tracks_itself=False),
    StageSpec("train_generator", ("pretokenize", "train_tokenizer"), ("train_generator",), _train_generator),
    StageSpec("train_understanding", ("pretokenize", "train_tokenizer"), ("train_understanding",),
              _train_understanding),
    StageSpec("eval_generation", ("corpus", "train_tokenizer", "train_generator"),
              ("eval.generation", "eval.seed", "eval.device", "train_generator.sampling"), _eval_generation),
    StageSpec("eval_understanding", ("corpus", "train_tokenizer", "train_understanding"),
              ("eval.understanding", "eval.seed", "eval.device"), _eval_understanding),
)
BY_NAME = {s.name: s for s in STAGES}


def resources(cfg: TokenFlowConfig, name: str) -> dict[str, float]:
    """The cluster resources a stage holds while it runs (for running stages side by side)."""
    if name in ("train_tokenizer", "train_generator", "train_understanding"):
        t = getattr(cfg, name)
        return {"CPU": t.num_workers * t.cpus_per_worker}
    if name == "pretokenize":
        return {"CPU": cfg.pretokenize.num_actors * cfg.pretokenize.cpus_per_actor}
    return {"CPU": 1.0}


def downstream(names: set[str]) -> set[str]:
    """``names`` and every stage that depends on them, transitively."""
    out = set(names)
    changed = True
    while changed:
        changed = False
        for spec in STAGES:
            if spec.name not in out and out.intersection(spec.inputs):
                out.add(spec.name)
                changed = True
    return out
