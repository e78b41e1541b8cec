"""The stage DAG of ``pipelines/full.py``: what each stage reads, needs and runs.

    corpus.<c> ──► train_tokenizer ──► [finetune_decoder] ──► eval_reconstruction
       │                  │
       ├──────► pretokenize.<c> ─────────────► train_understanding ──► eval_understanding, eval_pope,
       │                                                                [eval_understanding_lmms]
       └──────► [pretokenize_generation.<c>] ─► train_generator ──► eval_generation, eval_dpg

Every corpus a stage uses (``corpora``, named by each training section's ``data`` and by
``eval.corpus``) is its own ``corpus.<c>`` stage, and is pre-tokenized once per tokenizer view
(``pretokenize.<c>``), shared by every LLM stage that trains on it: adding a corpus to a mixture
runs only that corpus's stages again. Bracketed stages exist only when configured:
``finetune_decoder`` (the reference's decoder-only second phase) when its section is set, and then
every decoding evaluation uses its export; ``pretokenize_generation.<c>`` when
``train_generator.tokenizer_view`` tokenizes the generator's corpora at another resolution
(TokenFlow-B at 256 px), else the generator reads ``pretokenize.<c>``. The LLM stages and their
evaluations exist when their sections are set; ``eval_understanding_lmms`` when ``eval.lmms.tasks``
names lmms-eval tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from tokenflow import storage
from tokenflow.config import CORPUS_NOT_CONTENT, TokenFlowConfig, config_hash
from tokenflow.data.stage_data import StageData
from tokenflow.stages.stage_run import RunLink
from tokenflow.workflow.durable import StageOutput

Inputs = dict[str, StageOutput]
Runner = Callable[[TokenFlowConfig, Inputs, str, RunLink], dict[str, Any]]

STAGE_NAMES = ("train_tokenizer", "finetune_decoder", "eval_reconstruction", "train_generator",
               "train_understanding", "eval_generation", "eval_dpg", "eval_understanding", "eval_pope",
               "eval_understanding_lmms")
CORPUS_STAGES = ("corpus", "pretokenize", "pretokenize_generation")  # one stage per corpus: <kind>.<corpus>

MODEL_LIBRARIES = ("torch", "transformers", "open_clip_torch")
TRAINING_LIBRARIES = MODEL_LIBRARIES + ("deepspeed",)
CORPUS_LIBRARIES = ("numpy", "pillow")  # the shapes corpus is drawn with them

# Settings that change what a stage logs, how fast it runs or how it survives faults, never its output.
_TRAINING_LOGGING = ("log_every", "checkpoint_every", "cpus_per_worker", "use_gpu", "keep_checkpoints",
                     "max_failures", "corrupt_checkpoint", "placement_strategy")


def _excluded(section: str, *keys: str) -> tuple[str, ...]:
    return tuple(f"{section}.{k}" for k in _TRAINING_LOGGING + keys)


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]  # upstream stage names
    config: tuple[str, ...]  # dotted config paths the stage reads (its identity)
    module: str  # the stage's module: its code identity is what this module imports
    run: Runner  # (config, upstream outputs, output URL, run link) -> manifest
    exclude: tuple[str, ...] = ()  # dotted paths inside ``config`` that never change the output
    device: str | None = None  # "eval", "pretokenize" or a training section: how its device resolves
    libraries: tuple[str, ...] = MODEL_LIBRARIES
    sources: Callable[[TokenFlowConfig], dict[str, str]] | None = None  # data read from outside the pipeline

    @property
    def training_section(self) -> str | None:
        """The config section of a DeepSpeed-on-Ray-Train stage, else None."""
        return self.device if self.device not in (None, "eval", "pretokenize") else None


def _manifest(inputs: Inputs, name: str) -> dict[str, Any]:
    return inputs[name].manifest()


def corpus_stage(kind: str, corpus: str) -> str:
    """The name of a per-corpus stage: ``corpus.<c>``, ``pretokenize.<c>``, ``pretokenize_generation.<c>``."""
    return f"{kind}.{corpus}"


def _tokenizer_url(inputs: Inputs, stage: str = "train_tokenizer") -> str:
    """The tokenizer export of ``stage`` (train_tokenizer or finetune_decoder)."""
    return storage.join(inputs[stage].url, _manifest(inputs, stage)["tokenizer"]["path"])


def _model_dir(inputs: Inputs, stage: str) -> str:
    return storage.join(inputs[stage].url, _manifest(inputs, stage)["model"]["path"].rsplit("/", 1)[0])


def _data(cfg: TokenFlowConfig, inputs: Inputs, section: str, kind: str) -> list[StageData]:
    """The mixture of ``section`` (a training section, or ``train_understanding.align``): each
    corpus's weight and its ``kind`` stage's output."""
    return [StageData(e.corpus, e.weight, _manifest(inputs, corpus_stage(kind, e.corpus)),
                      inputs[corpus_stage(kind, e.corpus)].url) for e in cfg.stage_data(section)]


def _eval_corpus(cfg: TokenFlowConfig, inputs: Inputs) -> dict[str, Any]:
    return _manifest(inputs, corpus_stage("corpus", cfg.eval_corpus))


def _corpus_sources(cfg: TokenFlowConfig, name: str) -> dict[str, str]:
    """An indexed corpus' shards (or LLaVA JSON), by size and version (a shapes corpus is made from
    the config)."""
    from tokenflow.stages.corpus import source_listing

    c = cfg.corpora[name]
    return {} if c.source == "shapes" else {"source_shards": config_hash(source_listing(c))}


def _corpus(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink, name: str) -> dict[str, Any]:
    from tokenflow.stages.corpus import run_corpus

    return run_corpus(cfg, name, out, link)


def _train_tokenizer(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink) -> dict[str, Any]:
    from tokenflow.stages.train_tokenizer import run_train_tokenizer

    return run_train_tokenizer(cfg, _data(cfg, inputs, "train_tokenizer", "corpus"), out, link)


def _finetune_decoder(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink) -> dict[str, Any]:
    from tokenflow.stages.train_tokenizer import run_finetune_decoder

    return run_finetune_decoder(cfg, _data(cfg, inputs, "finetune_decoder", "corpus"), _tokenizer_url(inputs),
                                _manifest(inputs, "train_tokenizer")["tokenizer"]["sha256"], out, link)


def _pretokenize(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink, name: str,
                 for_generation: bool = False) -> dict[str, Any]:
    from tokenflow.stages.pretokenize import run_pretokenize

    kind, view = ("pretokenize_generation", cfg.generation_view) if for_generation else ("pretokenize", None)
    return run_pretokenize(cfg, corpus_stage(kind, name), _manifest(inputs, corpus_stage("corpus", name)),
                           _tokenizer_url(inputs), out, view, link)


def _train_generator(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink, tokens: str) -> dict[str, Any]:
    from tokenflow.stages.train_generator import run_train_generator

    return run_train_generator(cfg, _data(cfg, inputs, "train_generator", tokens), _tokenizer_url(inputs), out, link)


def _train_understanding(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink) -> dict[str, Any]:
    from tokenflow.stages.train_understanding import run_train_understanding

    align = _data(cfg, inputs, "train_understanding.align", "pretokenize") if cfg.train_understanding.align_steps else []
    return run_train_understanding(cfg, align,
                                   _data(cfg, inputs, "train_understanding", "pretokenize"),
                                   _tokenizer_url(inputs), out, link)


def _eval_reconstruction(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink,
                         decoder: str = "train_tokenizer") -> dict[str, Any]:
    from tokenflow.stages.eval_reconstruction import run_eval_reconstruction

    return run_eval_reconstruction(cfg, _eval_corpus(cfg, inputs), _tokenizer_url(inputs, decoder), out, link)


def _eval_generation(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink,
                     decoder: str = "train_tokenizer") -> dict[str, Any]:
    from tokenflow.stages.eval_generation import run_eval_generation

    return run_eval_generation(cfg, _eval_corpus(cfg, inputs), _model_dir(inputs, "train_generator"),
                               _tokenizer_url(inputs, decoder), out, link)


def _eval_dpg(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink,
              decoder: str = "train_tokenizer") -> dict[str, Any]:
    from tokenflow.stages.eval_dpg import run_eval_dpg

    return run_eval_dpg(cfg, _eval_corpus(cfg, inputs), _model_dir(inputs, "train_generator"),
                        _tokenizer_url(inputs, decoder), out, link)


def _eval_understanding(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink) -> dict[str, Any]:
    from tokenflow.stages.eval_understanding import run_eval_understanding

    return run_eval_understanding(cfg, _eval_corpus(cfg, inputs), _model_dir(inputs, "train_understanding"),
                                  _tokenizer_url(inputs), out, link)


def _eval_pope(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink) -> dict[str, Any]:
    from tokenflow.stages.eval_pope import run_eval_pope

    return run_eval_pope(cfg, _eval_corpus(cfg, inputs), _model_dir(inputs, "train_understanding"),
                         _tokenizer_url(inputs), out, link)


def _eval_understanding_lmms(cfg: TokenFlowConfig, inputs: Inputs, out: str, link: RunLink) -> dict[str, Any]:
    from tokenflow.stages.eval_understanding_lmms import run_eval_understanding_lmms

    return run_eval_understanding_lmms(cfg, _model_dir(inputs, "train_understanding"), _tokenizer_url(inputs), out,
                                       link)


def _lmms_sources(cfg: TokenFlowConfig) -> dict[str, str]:
    """The lmms-eval task folder's files, by size and version (the tasks' own data files count
    only through the task definitions naming them)."""
    from tokenflow.eval.lmms import task_folder_digest

    url = cfg.eval.lmms.include_path
    return {"lmms_tasks": task_folder_digest(url)} if url else {}


_STAGES = "tokenflow.stages."
_PRETOKENIZE_EXCLUDED = tuple(f"pretokenize.{k}" for k in (
    "batch_size", "num_actors", "cpus_per_actor", "gpus_per_actor", "max_actor_restarts", "max_task_retries",
    "max_attempts", "retry_wait_s"))


def _corpora_used(cfg: TokenFlowConfig) -> list[str]:
    """Every corpus a stage reads, in first-use order (the tokenizer's first)."""
    names = [e.corpus for s in cfg.training_sections for e in cfg.stage_data(s)]
    if cfg.train_understanding is not None:
        names += [e.corpus for e in cfg.understanding_data]
    return list(dict.fromkeys(names + [cfg.eval_corpus]))


def _corpus_specs(cfg: TokenFlowConfig) -> list[StageSpec]:
    """``corpus.<c>`` for every corpus used, ``pretokenize.<c>`` for the LLM stages' corpora at the
    tokenizer as trained and ``pretokenize_generation.<c>`` for the generator's at its view."""
    specs = []
    for name in _corpora_used(cfg):
        stage = corpus_stage("corpus", name)
        packed = ("limits",) if cfg.corpora[name].format == "llava" else ()  # records past the limits are not packed
        specs.append(StageSpec(stage, (), (f"corpora.{name}",) + packed, _STAGES + "corpus",
                               partial(_corpus, name=name), tuple(f"corpora.{name}.{k}" for k in CORPUS_NOT_CONTENT),
                               libraries=CORPUS_LIBRARIES, sources=partial(_corpus_sources, name=name)))
    for name in cfg.token_corpora:
        specs.append(StageSpec(corpus_stage("pretokenize", name), (corpus_stage("corpus", name), "train_tokenizer"),
                               ("pretokenize", "limits"), _STAGES + "pretokenize", partial(_pretokenize, name=name),
                               _PRETOKENIZE_EXCLUDED, "pretokenize"))
    if cfg.generation_view is not None:
        for e in cfg.stage_data("train_generator"):
            specs.append(StageSpec(corpus_stage("pretokenize_generation", e.corpus),
                                   (corpus_stage("corpus", e.corpus), "train_tokenizer"),
                                   ("pretokenize", "train_generator.tokenizer_view", "limits"), _STAGES + "pretokenize",
                                   partial(_pretokenize, name=e.corpus, for_generation=True), _PRETOKENIZE_EXCLUDED,
                                   "pretokenize"))
    return specs


def _stage_inputs(cfg: TokenFlowConfig, section: str, kind: str) -> tuple[str, ...]:
    return tuple(corpus_stage(kind, e.corpus) for e in cfg.stage_data(section))


def stages(cfg: TokenFlowConfig) -> tuple[StageSpec, ...]:
    """The DAG ``cfg`` asks for, in dependency order (every stage after its inputs)."""
    decoder = "finetune_decoder" if cfg.finetune_decoder is not None else "train_tokenizer"
    eval_corpus = corpus_stage("corpus", cfg.eval_corpus)
    decoding = (eval_corpus, "train_tokenizer") + ((decoder,) if decoder != "train_tokenizer" else ())
    tokenizer_excluded = ("image_every", "heldout_images")
    corpus_specs = _corpus_specs(cfg)
    # The data's weights and names are part of a training stage's identity (its ``data`` field).
    specs = [s for s in corpus_specs if s.name.startswith("corpus.")]
    specs.append(StageSpec("train_tokenizer", _stage_inputs(cfg, "train_tokenizer", "corpus"),
                           ("tokenizer", "train_tokenizer", "limits"), _STAGES + "train_tokenizer", _train_tokenizer,
                           _excluded("train_tokenizer", *tokenizer_excluded), "train_tokenizer", TRAINING_LIBRARIES))
    if cfg.finetune_decoder is not None:  # built from the trained export with the pipeline's loss settings
        specs.append(StageSpec("finetune_decoder", _stage_inputs(cfg, "finetune_decoder", "corpus") + ("train_tokenizer",),
                               ("finetune_decoder", "tokenizer.perceptual", "tokenizer.discriminator",
                                "tokenizer.loss_weights", "limits"), _STAGES + "train_tokenizer", _finetune_decoder,
                               _excluded("finetune_decoder", *tokenizer_excluded), "finetune_decoder",
                               TRAINING_LIBRARIES))
    specs.append(StageSpec("eval_reconstruction", decoding, ("eval.reconstruction", "eval.seed", "limits"),
                           _STAGES + "eval_reconstruction", partial(_eval_reconstruction, decoder=decoder),
                           device="eval"))
    specs += [s for s in corpus_specs if not s.name.startswith("corpus.")]
    gen = cfg.train_generator
    if gen is not None:
        tokens = "pretokenize_generation" if cfg.generation_view is not None else "pretokenize"
        specs.append(StageSpec("train_generator", _stage_inputs(cfg, "train_generator", tokens) + ("train_tokenizer",),
                               ("train_generator", "limits"), _STAGES + "train_generator",
                               partial(_train_generator, tokens=tokens),
                               _excluded("train_generator", "eval_every", "heldout_samples", "sample_prompts",
                                         "sampling"), "train_generator", TRAINING_LIBRARIES))
    if cfg.train_understanding is not None:
        token_inputs = dict.fromkeys(corpus_stage("pretokenize", e.corpus) for e in cfg.understanding_data)
        specs.append(StageSpec("train_understanding", tuple(token_inputs) + ("train_tokenizer",),
                               ("train_understanding", "limits"),
                               _STAGES + "train_understanding", _train_understanding,
                               _excluded("train_understanding", "eval_every", "heldout_questions", "max_new_tokens"),
                               "train_understanding", TRAINING_LIBRARIES))
    if gen is not None:  # sampling is inference: it belongs to the evaluation, not to the training
        sampling = ("eval.seed", "train_generator.sampling", "train_generator.tokenizer_view",
                    "train_generator.language_model.max_text_tokens", "limits")
        specs += [StageSpec("eval_generation", decoding + ("train_generator",), ("eval.generation",) + sampling,
                            _STAGES + "eval_generation", partial(_eval_generation, decoder=decoder), device="eval"),
                  StageSpec("eval_dpg", decoding + ("train_generator",), ("eval.dpg",) + sampling,
                            _STAGES + "eval_dpg", partial(_eval_dpg, decoder=decoder), device="eval")]
    if cfg.train_understanding is not None:
        answering = ("eval.seed", "train_understanding.max_new_tokens",
                     "train_understanding.language_model.max_text_tokens", "limits")
        specs += [StageSpec("eval_understanding", (eval_corpus, "train_tokenizer", "train_understanding"),
                            ("eval.understanding",) + answering, _STAGES + "eval_understanding", _eval_understanding,
                            device="eval"),
                  StageSpec("eval_pope", (eval_corpus, "train_tokenizer", "train_understanding"),
                            ("eval.pope",) + answering, _STAGES + "eval_pope", _eval_pope, device="eval")]
        if cfg.eval.lmms.tasks:
            specs.append(StageSpec("eval_understanding_lmms", ("train_tokenizer", "train_understanding"),
                                   ("eval.lmms", "eval.seed", "train_understanding.max_new_tokens",
                                    "train_understanding.language_model.max_text_tokens"),
                                   _STAGES + "eval_understanding_lmms", _eval_understanding_lmms, device="eval",
                                   libraries=MODEL_LIBRARIES + ("lmms-eval",), sources=_lmms_sources))
    return tuple(specs)


def resources(cfg: TokenFlowConfig, name: str, cluster_gpus: bool = False) -> dict[str, float]:
    """The cluster resources a stage holds while it runs (for running stages side by side; an
    evaluation's are its Ray task's). ``cluster_gpus``: whether ``auto`` settings find GPUs."""
    if name in ("train_tokenizer", "finetune_decoder", "train_generator", "train_understanding"):
        t = getattr(cfg, name)
        gpus = float(t.worker_range[0]) if t.use_gpu is True or (t.use_gpu == "auto" and cluster_gpus) else 0.0
        return {"CPU": t.worker_range[0] * t.cpus_per_worker, "GPU": gpus}
    if name.split(".", 1)[0] in ("pretokenize", "pretokenize_generation"):
        p = cfg.pretokenize
        per_actor = (1.0 if cluster_gpus else 0.0) if p.gpus_per_actor == "auto" else float(p.gpus_per_actor)
        return {"CPU": p.num_actors * p.cpus_per_actor, "GPU": p.num_actors * per_actor}
    if name.startswith("eval_"):
        return {"CPU": cfg.eval.num_cpus, "GPU": eval_gpus(cfg, cluster_gpus)}
    return {"CPU": 1.0}


def eval_gpus(cfg: TokenFlowConfig, cluster_gpus: bool) -> float:
    """GPUs of an evaluation's Ray task: ``eval.device`` cuda, or auto on a cluster with GPUs, holds one."""
    return 1.0 if cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and cluster_gpus) else 0.0


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
