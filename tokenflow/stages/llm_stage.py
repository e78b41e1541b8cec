"""Driver-side parts both LLM stages share: inputs and checks, the stage's run, the text
tokenizer, the workers' common job fields, the unigram baseline and the stage manifest."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.config import ConfigError, LanguageModelConfig, TokenFlowConfig, TokenizerView, config_hash
from tokenflow.data.examples import training_texts
from tokenflow.data.dedup import Duplicates, find_duplicates, token_shard_digests
from tokenflow.data.manifest import content_digest, directory_digests, file_digest
from tokenflow.data.stage_data import StageData
from tokenflow.data.token_shards import TokenShardError, iter_token_samples
from tokenflow.models.llm_weights import TEXT_TOKENIZER_DIR, WEIGHTS_NAME, save_text_tokenizer
from tokenflow.models.text import load_text_tokenizer, train_bpe
from tokenflow.models.weights import file_sha256
from tokenflow.stages.stage_run import RunLink, StageRun
from tokenflow.stages.lineage import drawn, log_mixture
from tokenflow.stages.training import resolve_use_gpu
from tokenflow.train.mixture import TokenSource, without_emptied

log = logging.getLogger(__name__)

EXPORT_DIR = "model"
_DESCRIPTIONS = {
    "train_generator": "Trains the text-to-image generator (next-scale prediction of the tokenizer's codes in "
                       "a causal LM) on token shards with DeepSpeed on Ray Train workers.",
    "train_understanding": "Trains the understanding model (the tokenizer's code features through an MLP "
                           "projector into a causal LM): caption alignment, then conversations.",
}


def token_shard_urls(token_manifest: dict[str, Any], token_url: str, split: str) -> list[str]:
    """The URLs of one split's token shards, in manifest order."""
    if split not in token_manifest.get("splits", {}):
        raise TokenShardError(f"{token_url}: the token shards have no {split!r} split")
    return [storage.join(token_url, e["path"]) for e in token_manifest["splits"][split]["shards"]]


def check_tokenizer(token_manifests: list[dict[str, Any]], tokenizer_url: str) -> str:
    """The tokenizer export's sha256 (read once), after checking it made every set of token shards."""
    digest = file_sha256(storage.local_path(tokenizer_url))
    for manifest in token_manifests:
        if manifest["inputs"]["tokenizer"] != digest:
            raise TokenShardError(f"{tokenizer_url} (sha256 {digest[:12]}) did not make these token shards "
                                  f"(made by {manifest['inputs']['tokenizer'][:12]})")
    return digest


def prepare_text_tokenizer(cfg: LanguageModelConfig, train_urls: list[str], url: str) -> PreTrainedTokenizerBase:
    """Load the configured text tokenizer or train the smoke BPE; save it to ``url`` either way."""
    if cfg.text_tokenizer is not None:
        tok = load_text_tokenizer(cfg.text_tokenizer)
    else:
        tok = train_bpe(training_texts(train_urls), cfg.bpe_vocab_size)
        log.info("trained a %d-token byte-level BPE on the training split's texts", len(tok))
    save_text_tokenizer(tok, url)
    return tok


def unigram_entropy(sources: list[TokenSource], codebook_size: int) -> float:
    """Entropy (nats) of the token unigram distribution of the training mixture (each corpus's
    frequencies weighted by its share, over the rows training reads: deduplication's dropped rows
    left out): the loss of a model that ignores every input."""
    mixed = np.zeros(codebook_size, dtype=np.float64)
    total_weight = sum(s.weight for s in sources)
    for source in sources:
        counts = np.zeros(codebook_size, dtype=np.int64)
        for shard in source.shards:
            for sample in source.kept(shard, iter_token_samples([shard])):
                counts += np.bincount(sample.tokens, minlength=codebook_size)
        if counts.sum():
            mixed += source.weight / total_weight * counts / counts.sum()
    p = mixed[mixed > 0] / mixed.sum() if mixed.sum() else mixed[:0]
    return float(-(p * np.log(p)).sum()) if p.size else math.nan


def check_view(token_manifest: dict[str, Any], token_url: str, view: TokenizerView | None) -> None:
    """Raise unless the token shards were made at ``view`` (None: the tokenizer as trained)."""
    made = token_manifest.get("tokenizer_view")
    wanted = view.model_dump(mode="json") if view is not None else None
    if made != wanted:
        raise TokenShardError(f"{token_url}: these token shards were made at tokenizer view {made}, "
                              f"the stage needs {wanted} (pretokenize_generation makes the generator's)")


def open_llm_stage(cfg: TokenFlowConfig, stage: str, data: list[StageData], tokenizer_url: str, out_url: str,
                   link: RunLink | None, view: TokenizerView | None = None) -> StageRun:
    """Check the inputs (every corpus's token shards made by this tokenizer, at ``view``) and
    return the stage's run, to be entered (``with``) around the training."""
    if getattr(cfg, stage) is None:
        raise ConfigError(f"the config has no {stage} section")
    for d in data:
        check_view(d.manifest, d.url, view)
    inputs = {**{f"tokens.{d.corpus}": content_digest(d.manifest) for d in data},
              "tokenizer": check_tokenizer([d.manifest for d in data], tokenizer_url)}
    return StageRun(cfg, stage, {stage}, out_url, inputs, link, _DESCRIPTIONS[stage])


def token_sources(data: list[StageData], split: str) -> list[TokenSource]:
    """Each corpus's token shards of ``split`` as a mixture source."""
    return [TokenSource(d.corpus, d.weight, token_shard_urls(d.manifest, d.url, split)) for d in data]


def _shard_rows(d: StageData, split: str) -> dict[str, int]:
    return {storage.join(d.url, e["path"]): int(e["rows"]) for e in d.manifest["splits"][split]["shards"]}


def mixture_sources(run: StageRun, data: list[StageData],
                    phase: str = "") -> tuple[list[TokenSource], list[dict[str, Any]]]:
    """The training mixture of ``data`` (duplicates across its corpora dropped) and its lineage
    table (each corpus's token shards, digest, weight, rows and duplicates), logged on ``run``."""
    t = getattr(run.cfg, run.stage)
    sources = token_sources(data, "train")
    dedup = Duplicates() if t.dedup == "off" else find_duplicates(
        [(s.corpus, s.shards) for s in sources], partial(token_shard_digests, pairs=t.dedup == "pairs"))
    workers = t.worker_range[1]
    kept = [without_emptied(replace(s, dropped=dedup.dropped.get(s.corpus, {})), _shard_rows(d, "train").__getitem__,
                            workers) for s, d in zip(sources, data)]
    return kept, log_mixture(run, data, dedup, phase)


def llm_job_fields(cfg: TokenFlowConfig, stage: str, run: StageRun, data: list[StageData], tokenizer_url: str,
                   out_url: str, train: list[TokenSource], texts: list[TokenSource] = ()) -> dict[str, Any]:
    """Prepare the text tokenizer (trained on the texts of ``train`` and ``texts``) in the export
    directory and return the fields of :class:`~tokenflow.train.jobs.LLMJob` every LLM worker
    reads (``train``: the mixture; the held-out split: every corpus of ``data``)."""
    t = getattr(cfg, stage)
    export_dir = storage.join(out_url, EXPORT_DIR)
    text_tokenizer_url = storage.join(export_dir, TEXT_TOKENIZER_DIR)
    urls = list(dict.fromkeys(u for s in [*train, *texts] for u in s.shards))
    prepare_text_tokenizer(t.language_model, urls, text_tokenizer_url)
    return {"config": cfg, "use_gpu": resolve_use_gpu(t.use_gpu), "tracking_uri": run.tracking_uri,
            "mlflow_run_id": run.run_id, "train": train,
            "heldout": token_sources(data, "heldout"),
            "tokenizer_url": tokenizer_url, "token_scales": data[0].manifest["scales"],
            "text_tokenizer_url": text_tokenizer_url, "export_dir": export_dir}


def finish_llm_stage(run: StageRun, out_url: str, steps: int, kind: str,
                     data: dict[str, tuple[list[dict[str, Any]], str]]) -> dict[str, Any]:
    """Tag the export's digest on the run and finish it (the stage manifest, with each phase's
    mixture table and the samples drawn per corpus, written last). ``data``: phase -> (its
    mixture table, the prefix of its metrics)."""
    size, sha = file_digest(storage.join(out_url, EXPORT_DIR, WEIGHTS_NAME))
    text_digest = config_hash(directory_digests(storage.join(out_url, EXPORT_DIR, TEXT_TOKENIZER_DIR)))
    run.tag("tokenflow.model_sha256", sha)
    run.register_model(storage.join(out_url, EXPORT_DIR), WEIGHTS_NAME, sha)
    return run.finish({"kind": kind, "model": {"path": f"{EXPORT_DIR}/{WEIGHTS_NAME}", "bytes": size, "sha256": sha},
                       "text_tokenizer": {"path": f"{EXPORT_DIR}/{TEXT_TOKENIZER_DIR}", "digest": text_digest},
                       "steps": steps,
                       "data": {phase: drawn(run, table, prefix) for phase, (table, prefix) in data.items()}})
