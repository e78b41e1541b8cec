"""The stage DAG of ``pipelines/full.py``: what each stage reads, needs and runs.

    corpus ──► train_tokenizer ──► [finetune_decoder] ──► eval_reconstruction
       │              │
       ├────────► pretokenize ──────────────► train_understanding ──► eval_understanding
       └────────► [pretokenize_generation] ─► train_generator ──► eval_generation

Bracketed stages exist only when configured: ``finetune_decoder`` (the reference's decoder-only
second phase) when its section is set, and then every decoding evaluation uses its export;
``pretokenize_generation`` when ``train_generator.tokenizer_view`` tokenizes the generator's
corpus at another resolution (TokenFlow-B at 256 px), else the generator reads ``pretokenize``.
The LLM stages and their evaluations exist when their sections are set.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.workflow.durable import StageOutput

Inputs = dict[str, StageOutput]
Runner = Callable[[TokenFlowConfig, Inputs, str, str | None], dict[str, Any]]

STAGE_NAMES = ("corpus", "train_tokenizer", "finetune_decoder", "eval_reconstruction", "pretokenize",
               "pretokenize_generation", "train_generator", "train_understanding", "eval_generation",
               "eval_understanding")


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]  # upstream stage names
    config: tuple[str, ...]  # dotted config paths the stage reads (its identity)
    run: Runner  # (config, upstream outputs, output URL, parent MLflow run id) -> manifest
    tracks_itself: bool = True  # opens its own MLflow run (else the driver opens one)


def _manifest(inputs: Inputs, name: str) -> dict[str, Any]:
    return inputs[name].manifest()


def _tokenizer_url(inputs: Inputs, stage: str = "train_tokenizer") -> str:
    """The tokenizer export of ``stage`` (train_tokenizer or finetune_decoder)."""
    return storage.join(inputs[stage].url, _manifest(inputs, stage)["tokenizer"]["path"])


def _model_dir(inputs: Inputs, stage: str) -> str:
    return storage.join(inputs[stage].url, _manifest(inputs, stage)["model"]["path"].rsplit("/", 1)[0])


def _corpus(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.corpus import build_corpus

    return build_corpus(cfg.corpus, out)


def _train_tokenizer(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.train_tokenizer import run_train_tokenizer

    return run_train_tokenizer(cfg, _manifest(inputs, "corpus"), out, parent)


def _finetune_decoder(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.train_tokenizer import run_finetune_decoder

    return run_finetune_decoder(cfg, _manifest(inputs, "corpus"), _tokenizer_url(inputs),
                                _manifest(inputs, "train_tokenizer")["tokenizer"]["sha256"], out, parent)


def _pretokenize(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None,
                 for_generation: bool = False) -> dict[str, Any]:
    from tokenflow.stages.pretokenize import run_pretokenize

    view = cfg.generation_view if for_generation else None
    return run_pretokenize(_manifest(inputs, "corpus"), _tokenizer_url(inputs), out, cfg.pretokenize, view)


def _train_generator(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None,
                     tokens: str = "pretokenize") -> dict[str, Any]:
    from tokenflow.stages.train_generator import run_train_generator

    return run_train_generator(cfg, _manifest(inputs, tokens), inputs[tokens].url, _tokenizer_url(inputs), out,
                               parent)


def _train_understanding(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.train_understanding import run_train_understanding

    return run_train_understanding(cfg, _manifest(inputs, "pretokenize"), inputs["pretokenize"].url,
                                   _tokenizer_url(inputs), out, parent)


def _eval_reconstruction(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None,
                         decoder: str = "train_tokenizer") -> dict[str, Any]:
    from tokenflow.stages.evaluate import run_eval_reconstruction

    return run_eval_reconstruction(cfg, _manifest(inputs, "corpus"), _tokenizer_url(inputs, decoder), out, parent)


def _eval_generation(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None,
                     decoder: str = "train_tokenizer") -> dict[str, Any]:
    from tokenflow.stages.evaluate import run_eval_generation

    return run_eval_generation(cfg, _manifest(inputs, "corpus"), _model_dir(inputs, "train_generator"),
                               _tokenizer_url(inputs, decoder), out, parent)


def _eval_understanding(cfg: TokenFlowConfig, inputs: Inputs, out: str, parent: str | None) -> dict[str, Any]:
    from tokenflow.stages.evaluate import run_eval_understanding

    return run_eval_understanding(cfg, _manifest(inputs, "corpus"), _model_dir(inputs, "train_understanding"),
                                  _tokenizer_url(inputs), out, parent)


def stages(cfg: TokenFlowConfig) -> tuple[StageSpec, ...]:
    """The DAG ``cfg`` asks for, in dependency order (every stage after its inputs)."""
    decoder = "finetune_decoder" if cfg.finetune_decoder is not None else "train_tokenizer"
    decoding = ("corpus", "train_tokenizer") + ((decoder,) if decoder != "train_tokenizer" else ())
    specs = [StageSpec("corpus", (), ("corpus",), _corpus, tracks_itself=False),
             StageSpec("train_tokenizer", ("corpus",), ("tokenizer", "train_tokenizer"), _train_tokenizer)]
    if cfg.finetune_decoder is not None:
        specs.append(StageSpec("finetune_decoder", ("corpus", "train_tokenizer"), ("finetune_decoder",),
                               _finetune_decoder))
    specs += [StageSpec("eval_reconstruction", decoding, ("eval.reconstruction", "eval.seed", "eval.device"),
                        partial(_eval_reconstruction, decoder=decoder)),
              StageSpec("pretokenize", ("corpus", "train_tokenizer"), ("pretokenize",), _pretokenize,
                        tracks_itself=False)]
    gen = cfg.train_generator
    if gen is not None:
        tokens = "pretokenize"
        if cfg.generation_view is not None:
            tokens = "pretokenize_generation"
            specs.append(StageSpec(tokens, ("corpus", "train_tokenizer"),
                                   ("pretokenize", "train_generator.tokenizer_view"),
                                   partial(_pretokenize, for_generation=True), tracks_itself=False))
        specs.append(StageSpec("train_generator", (tokens, "train_tokenizer"), ("train_generator",),
                               partial(_train_generator, tokens=tokens)))
    if cfg.train_understanding is not None:
        specs.append(StageSpec("train_understanding", ("pretokenize", "train_tokenizer"), ("train_understanding",),
                               _train_understanding))
    if gen is not None:
        specs.append(StageSpec("eval_generation", decoding + ("train_generator",),
                               ("eval.generation", "eval.seed", "eval.device", "train_generator.sampling"),
                               partial(_eval_generation, decoder=decoder)))
    if cfg.train_understanding is not None:
        specs.append(StageSpec("eval_understanding", ("corpus", "train_tokenizer", "train_understanding"),
                               ("eval.understanding", "eval.seed", "eval.device"), _eval_understanding))
    return tuple(specs)


def resources(cfg: TokenFlowConfig, name: str) -> dict[str, float]:
    """The cluster resources a stage holds while it runs (for running stages side by side)."""
    if name in ("train_tokenizer", "finetune_decoder", "train_generator", "train_understanding"):
        t = getattr(cfg, name)
        return {"CPU": t.num_workers * t.cpus_per_worker}
    if name in ("pretokenize", "pretokenize_generation"):
        return {"CPU": cfg.pretokenize.num_actors * cfg.pretokenize.cpus_per_actor}
    return {"CPU": 1.0}


def downstream(specs: tuple[StageSpec, ...], names: set[str]) -> set[str]:
    """``names`` and every stage of ``specs`` that depends on them, transitively."""
    out = set(names)
    changed = True
    while changed:
        changed = False
        for spec in specs:
            if spec.name not in out and out.intersection(spec.inputs):
                out.add(spec.name)
                changed = True
    return out
