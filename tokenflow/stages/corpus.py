"""The corpus stage: build the shapes corpus or index existing shards, and write its manifest.

``run_corpus`` is the pipeline stage (its own MLflow run); ``build_corpus`` the same work
without tracking (the ``tokenflow`` CLI, tests, benchmarks)."""

from __future__ import annotations

import logging
from typing import Any

from tokenflow import storage
from tokenflow.config import CorpusConfig, TokenFlowConfig
from tokenflow.data.corpus import CorpusError, corpus_listing, list_shards
from tokenflow.data.manifest import MANIFEST_NAME, ShardRecord, corpus_manifest, index_shard
from tokenflow.data.shapes import write_shapes_corpus
from tokenflow.stages.stage_run import RunLink, StageRun

log = logging.getLogger(__name__)


def corpus_splits(cfg: CorpusConfig, out_url: str) -> dict[str, list[str]]:
    """Shard URLs per split: generated for ``shapes``, listed for ``url``."""
    if cfg.source == "shapes":
        s = cfg.shapes
        return write_shapes_corpus(storage.join(out_url, "data"), s.num_samples, s.shard_size, s.seed,
                                   s.heldout_fraction, s.image_size)
    train = list_shards(cfg.url)
    if cfg.heldout_url:
        return {"train": train, "heldout": list_shards(cfg.heldout_url)}
    if cfg.heldout_shards >= len(train):
        raise CorpusError(f"{cfg.url}: {len(train)} shards cannot spare {cfg.heldout_shards} for held-out")
    cut = len(train) - cfg.heldout_shards
    return {"train": train[:cut], "heldout": train[cut:]}


def index_shards(urls: list[str]) -> list[ShardRecord]:
    """Index shards (count, size, sha256): as parallel Ray tasks when connected to Ray."""
    import ray

    if not ray.is_initialized():
        return [index_shard(u) for u in urls]
    task = ray.remote(num_cpus=1)(index_shard)
    return ray.get([task.remote(u) for u in urls])


def make_corpus(cfg: CorpusConfig, out_url: str) -> dict[str, Any]:
    """Make or index the corpus; returns its manifest (not yet written)."""
    splits = corpus_splits(cfg, out_url)
    records = {split: index_shards(urls) for split, urls in splits.items()}
    source = cfg.model_dump(mode="json", exclude={"on_source_change"})
    manifest = corpus_manifest(records, source)
    if cfg.source == "url":  # what on_source_change compares a later run's shards with
        manifest["source_listing"] = corpus_listing([u for u in (cfg.url, cfg.heldout_url) if u])
    for split, block in manifest["splits"].items():
        log.info("corpus %s: %d shards, %d samples, %.1f MB", split, len(block["shards"]),
                 block["samples"], block["bytes"] / 1e6)
    return manifest


def build_corpus(cfg: CorpusConfig, out_url: str) -> dict[str, Any]:
    """Make or index the corpus, write ``<out_url>/_MANIFEST.json`` last, and return the manifest."""
    manifest = make_corpus(cfg, out_url)
    storage.write_json_atomic(storage.join(out_url, MANIFEST_NAME), manifest)
    return manifest


def run_corpus(cfg: TokenFlowConfig, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """The pipeline's corpus stage: :func:`make_corpus` in its MLflow run; returns the manifest."""
    with StageRun(cfg, "corpus", {"corpus"}, out_url, {}, link,
                  "Makes (shapes) or indexes the image corpus: every shard's sample count, size and sha256.") as run:
        return run.finish(make_corpus(cfg.corpus, out_url))


def source_changes(outputs_url: str, cfg: CorpusConfig) -> str | None:
    """How the shards of the indexed corpus ``cfg`` differ from those a completed corpus output
    under ``outputs_url`` (the corpus stage's directory of outputs) was made from, or None when
    no completed output of this corpus config exists or none differs."""
    fs, root = storage.filesystem(outputs_url)
    if not fs.isdir(root):
        return None
    source = cfg.model_dump(mode="json", exclude={"on_source_change"})
    current = corpus_listing([u for u in (cfg.url, cfg.heldout_url) if u])
    for made in sorted(fs.ls(root, detail=False)):
        url = storage.join(outputs_url, storage.basename(made), MANIFEST_NAME)
        try:
            manifest = storage.read_json(url)
        except (FileNotFoundError, ValueError):
            continue
        if manifest.get("source") != source or "source_listing" not in manifest:
            continue
        before = manifest["source_listing"]
        if before == current:
            continue
        added = sorted(set(current) - set(before))
        removed = sorted(set(before) - set(current))
        rewritten = sorted(u for u in set(before) & set(current) if before[u] != current[u])
        parts = [f"{label}: {', '.join(urls[:5])}{' ...' if len(urls) > 5 else ''}"
                 for label, urls in (("added", added), ("removed", removed), ("rewritten", rewritten)) if urls]
        return f"since {url} was made, shards were " + "; ".join(parts)
    return None

