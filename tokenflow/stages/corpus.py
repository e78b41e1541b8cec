"""The corpus stages: build the shapes corpus, index existing shards, or pack LLaVA-style JSON
into Parquet shards, and write the corpus manifest. One stage per corpus (``corpus.<name>``).

``run_corpus`` is the pipeline stage (its own MLflow run); ``build_corpus`` the same work
without tracking (the ``tokenflow`` CLI, tests, benchmarks)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from tokenflow import storage
from tokenflow.config import CORPUS_NOT_CONTENT, DEFAULT_LIMITS, CorpusConfig, SampleLimitsConfig, TokenFlowConfig
from tokenflow.data.corpus import CorpusError, ReaderOptions, corpus_listing, img2dataset_status, resolve_listing
from tokenflow.data.manifest import MANIFEST_NAME, corpus_manifest, digests_url, index_shard
from tokenflow.data.shapes import write_shapes_corpus
from tokenflow.stages.stage_run import RunLink, StageRun

log = logging.getLogger(__name__)


def _remote(fn: Any, calls: list[tuple]) -> list[Any]:
    """``fn(*args)`` for every ``args`` of ``calls``: as parallel Ray tasks when connected to Ray."""
    import ray

    if not ray.is_initialized():
        return [fn(*args) for args in calls]
    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(*args) for args in calls])


def _pack_llava(cfg: CorpusConfig, out_url: str, limits: SampleLimitsConfig) -> tuple[list[str], dict[str, int]]:
    """Pack the LLaVA JSON at ``cfg.url`` into Parquet shards under ``out_url``; (shard URLs, counts)."""
    from tokenflow.data.llava import llava_records, pack_llava_shard, plan_llava_shards

    records = llava_records(cfg.url, limits)
    groups = plan_llava_shards(records, cfg.llava.shard_size)
    data = storage.join(out_url, "data")
    counts = _remote(pack_llava_shard, [(g, cfg.llava.image_root, data, f"llava-{i:06d}") for i, g in enumerate(groups)])
    total = {k: sum(c[k] for c in counts) for k in ("records", "missing_image", "text_only", "invalid")}
    if not total["records"]:
        raise CorpusError(f"{cfg.url}: no record with an image to pack ({total}; docs/data.md lists what is packed)")
    return [storage.join(data, f"llava-{i:06d}.parquet") for i in range(len(groups))], total


def _split(cfg: CorpusConfig, train: list[str]) -> dict[str, list[str]]:
    """Train and held-out shards: the held-out URL's, else the last ``heldout_shards`` of ``train``."""
    if cfg.heldout_url:
        return {"train": train, "heldout": resolve_listing(cfg.heldout_url, cfg.format)[1]}
    if cfg.heldout_shards >= len(train):
        raise CorpusError(f"{cfg.url}: {len(train)} shards cannot spare {cfg.heldout_shards} for held-out")
    cut = len(train) - cfg.heldout_shards
    return {"train": train[:cut], "heldout": train[cut:]}


def make_corpus(cfg: CorpusConfig, out_url: str, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> dict[str, Any]:
    """Make, pack or index the corpus; returns its manifest (not yet written)."""
    extra: dict[str, Any] = {}
    reader = ReaderOptions.from_config(cfg)
    if cfg.source == "shapes":
        s = cfg.shapes
        splits = write_shapes_corpus(storage.join(out_url, "data"), s.num_samples, s.shard_size, s.seed,
                                     s.heldout_fraction, s.image_size)
    elif cfg.format == "llava":
        shards, extra["llava"] = _pack_llava(cfg, out_url, limits)
        splits = _split(cfg, shards)
        log.info("packed %s: %s", cfg.url, extra["llava"])
    else:
        fmt, train = resolve_listing(cfg.url, cfg.format)
        reader = ReaderOptions.from_config(cfg.model_copy(update={"format": fmt}))
        splits = _split(cfg, train)
        tars = [u for urls in splits.values() for u in urls] if fmt == "webdataset" else []
        if status := sum((Counter(c) for c in _remote(img2dataset_status, [([u],) for u in tars])), Counter()):
            extra["img2dataset_status"] = dict(status)  # what img2dataset could not download never reached the tars
    records = {split: _remote(index_shard, [(u, reader, digests_url(out_url, split, storage.basename(u))) for u in urls])
               for split, urls in splits.items()}
    manifest = {**corpus_manifest(records, corpus_source(cfg), reader=reader),
                **extra}
    if not manifest["splits"]["train"]["samples"]:
        raise CorpusError(f"{cfg.url or 'the shapes corpus'}: the training split holds no sample"
                          + (f" (LLaVA records: {extra['llava']})" if "llava" in extra else ""))
    if cfg.source == "url":  # what on_source_change compares a later run's shards with
        manifest["source_listing"] = source_listing(cfg)
    for split, block in manifest["splits"].items():
        log.info("corpus %s: %d shards, %d samples, %.1f MB", split, len(block["shards"]),
                 block["samples"], block["bytes"] / 1e6)
    return manifest


def corpus_source(cfg: CorpusConfig) -> dict[str, Any]:
    """The corpus config as its manifest records it (what the corpus is made from)."""
    return cfg.model_dump(mode="json", exclude=set(CORPUS_NOT_CONTENT))


def source_listing(cfg: CorpusConfig) -> dict[str, str]:
    """``{URL: size and version}`` of what an indexed corpus is read from (its shards; for llava
    the JSON file, not every image it names), from file metadata only."""
    if cfg.format == "llava":
        fs, path = storage.filesystem(cfg.url)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise CorpusError(f"{cfg.url}: no such file (the corpus's LLaVA JSON)") from None
        return {cfg.url: f"{info.get('size')}:{storage.object_version(info)}"}
    return corpus_listing([u for u in (cfg.url, cfg.heldout_url) if u], cfg.format)


def build_corpus(cfg: CorpusConfig, out_url: str, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> dict[str, Any]:
    """Make or index the corpus, write ``<out_url>/_MANIFEST.json`` last, and return the manifest."""
    manifest = make_corpus(cfg, out_url, limits)
    storage.write_json_atomic(storage.join(out_url, MANIFEST_NAME), manifest)
    return manifest


def run_corpus(cfg: TokenFlowConfig, name: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """The pipeline's ``corpus.<name>`` stage: :func:`make_corpus` in its MLflow run; returns the manifest."""
    with StageRun(cfg, f"corpus.{name}", {"corpora"}, out_url, {}, link,
                  f"Makes (shapes), packs (llava) or indexes the image corpus {name!r}: every shard's sample "
                  "count, size and sha256.") as run:
        manifest = make_corpus(cfg.corpora[name], out_url, cfg.limits)
        run.metrics({f"{split}/samples": float(block["samples"]) for split, block in manifest["splits"].items()})
        for key in ("llava", "img2dataset_status"):
            if key in manifest:
                run.metrics({f"{key}/{k}": float(v) for k, v in manifest[key].items()})
        return run.finish(manifest)


def source_changes(outputs_url: str, cfg: CorpusConfig) -> str | None:
    """How the sources of the indexed corpus ``cfg`` differ from those a completed corpus output
    under ``outputs_url`` (the corpus stage's directory of outputs) was made from, or None when
    no completed output of this corpus config exists or none differs."""
    fs, root = storage.filesystem(outputs_url)
    if not fs.isdir(root):
        return None
    source = corpus_source(cfg)
    current = source_listing(cfg)
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
