"""The pre-tokenize stage: every corpus shard becomes one token shard, exactly once.

Ray Data schedules whole shards onto a pool of actors (one tokenizer each, a GPU each when the
cluster has GPUs). Each actor writes its token shard atomically; shards already present are
skipped, so a killed run resumes where it stopped and ends byte-identical to an uninterrupted
one. The manifest is written last, after every count has been reconciled with the corpus.
``run_pretokenize`` is the pipeline stage (its own MLflow run); ``pretokenize_corpus`` the same
work without tracking.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenflow import storage
from tokenflow.config import PretokenizeConfig, TokenFlowConfig, TokenizerView
from tokenflow.data.manifest import MANIFEST_NAME, ShardRecord, content_digest, file_digest, shard_records
from tokenflow.data.shard_encoder import (ShardEncoder, encoding_hash, quarantine_part_url,
                                          token_shard_url)
from tokenflow.data.token_shards import (QUARANTINE_NAME, QUARANTINE_SCHEMA,
                                         SCHEMA_VERSION, TokenShardError, parquet_bytes,
                                         read_shard_info, read_table)
from tokenflow.stages.stage_run import RunLink, StageRun

log = logging.getLogger(__name__)

_RECORD_FIELDS = tuple(ShardRecord.__dataclass_fields__)


class _EncoderActor:
    """Ray Data actor: one :class:`ShardEncoder`; each batch row is one corpus shard."""

    def __init__(self, **kwargs: Any):
        import torch

        device = "cuda" if kwargs.pop("use_gpu") and torch.cuda.is_available() else "cpu"
        self.encoder = ShardEncoder(device=device, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = []
        for i in range(len(batch["split"])):
            record = ShardRecord(**{f: _scalar(batch[f][i]) for f in _RECORD_FIELDS})
            results.append(self.encoder.encode_shard(record, str(batch["split"][i])))
        return {k: [asdict(r)[k] for r in results] for k in asdict(results[0])}


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _resolve_gpus(cfg: PretokenizeConfig) -> float:
    import ray

    if cfg.gpus_per_actor != "auto":
        return float(cfg.gpus_per_actor)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def run_pretokenize(cfg: TokenFlowConfig, stage: str, corpus_manifest: dict[str, Any], tokenizer_url: str,
                    out_url: str, view: TokenizerView | None = None, link: RunLink | None = None) -> dict[str, Any]:
    """The pipeline's ``pretokenize`` (or, at ``view``, ``pretokenize_generation``) stage: the
    token shards in the stage's MLflow run; returns the manifest."""
    inputs = {"corpus_manifest": content_digest(corpus_manifest), "tokenizer": _tokenizer_digest(tokenizer_url)}
    with StageRun(cfg, stage, {"pretokenize"}, out_url, inputs, link,
                  "Encodes every corpus shard into a Parquet token shard with the tokenizer export"
                  + (f" at {view.image_size} px, scales {list(view.scales)}" if view is not None else "")
                  + "; undecodable samples are quarantined.") as run:
        manifest = encode_corpus(corpus_manifest, tokenizer_url, inputs["tokenizer"], out_url, cfg.pretokenize, view)
        run.metrics({f"{split}/{key}": float(block[key]) for split, block in manifest["splits"].items()
                     for key in ("rows", "quarantined")})
        return run.finish(manifest)


def pretokenize_corpus(corpus_manifest: dict[str, Any], tokenizer_url: str, out_url: str,
                       cfg: PretokenizeConfig, view: TokenizerView | None = None) -> dict[str, Any]:
    """Tokenize every shard of every split of a corpus into ``out_url`` (with the tokenizer at
    ``view`` when given); writes and returns the manifest."""
    manifest = encode_corpus(corpus_manifest, tokenizer_url, _tokenizer_digest(tokenizer_url), out_url, cfg, view)
    storage.write_json_atomic(storage.join(out_url, MANIFEST_NAME), manifest)
    return manifest


def _tokenizer_digest(tokenizer_url: str) -> str:
    from tokenflow.models.weights import file_sha256

    return file_sha256(storage.local_path(tokenizer_url))


def encode_corpus(corpus_manifest: dict[str, Any], tokenizer_url: str, tokenizer_digest: str, out_url: str,
                  cfg: PretokenizeConfig, view: TokenizerView | None = None) -> dict[str, Any]:
    """Encode every shard not yet encoded with the tokenizer export at ``tokenizer_url`` (sha256
    ``tokenizer_digest``), then reconcile them all; returns the manifest (not yet written)."""
    import ray

    items = [{"split": split, **asdict(r)} for split in corpus_manifest["splits"]
             for r in shard_records(corpus_manifest, split)]
    gpus = _resolve_gpus(cfg)
    if removed := storage.remove_stale_temps(out_url):
        log.info("removed %d temp files left by an interrupted run", removed)
    start = time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _EncoderActor,
        fn_constructor_kwargs=dict(
            tokenizer_url=tokenizer_url, out_url=out_url, batch_size=cfg.batch_size,
            micro_batch=cfg.micro_batch, max_pixels=cfg.max_image_pixels,
            compression=cfg.compression, allow_tf32=cfg.allow_tf32, use_gpu=gpus > 0, view=view),
        batch_size=1,
        concurrency=cfg.num_actors,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
    )
    results = ds.take_all()
    # Ray Data releases the actor pool when its executor is collected; a reference cycle can keep
    # it (and its CPUs or GPUs) until the next garbage collection, and a training stage that
    # needs those resources next would wait for them forever (seen in CI).
    del ds
    gc.collect()
    elapsed = time.perf_counter() - start
    done = [r for r in results if not r["skipped"]]
    rows = sum(r["rows"] for r in done)
    log.info("pretokenize: %d shards encoded (%d already done), %d samples in %.1fs (%.1f samples/s), "
             "%d quarantined", len(done), len(results) - len(done), rows, elapsed,
             rows / max(elapsed, 1e-9), sum(r["quarantined"] for r in done))
    return finalize(corpus_manifest, out_url, tokenizer_digest, cfg, view)


def finalize(corpus_manifest: dict[str, Any], out_url: str, tokenizer_digest: str,
             cfg: PretokenizeConfig, view: TokenizerView | None = None) -> dict[str, Any]:
    """Reconcile every shard with the corpus (each made by the tokenizer of sha256
    ``tokenizer_digest``) and merge the quarantine; returns the manifest."""
    splits: dict[str, Any] = {}
    quarantine_tables = []
    first_info = None
    for split in corpus_manifest["splits"]:
        entries = []
        for record in shard_records(corpus_manifest, split):
            url = token_shard_url(out_url, split, record.name)
            if not storage.exists(url):
                raise TokenShardError(f"{url}: missing; pretokenize did not finish this shard")
            info = read_shard_info(url)
            first_info = first_info or info
            if info.tokenizer_digest != tokenizer_digest or info.source_sha256 != record.sha256:
                raise TokenShardError(f"{url}: made from another tokenizer or source shard")
            q_url = quarantine_part_url(out_url, split, record.name)
            if not storage.exists(q_url):
                raise TokenShardError(f"{q_url}: quarantine part missing")
            q_table = read_table(q_url)
            quarantine_tables.append(q_table)
            n_rows = _parquet_rows(url)
            if n_rows + q_table.num_rows != record.samples:
                raise TokenShardError(
                    f"{split}/{record.name}: {n_rows} tokenized + {q_table.num_rows} quarantined "
                    f"!= {record.samples} samples in the corpus manifest")
            size, sha = file_digest(url)
            entries.append({"name": record.name.rsplit(".", 1)[0] + ".parquet",
                            "path": f"shards/{split}/{record.name.rsplit('.', 1)[0]}.parquet",
                            "source": record.name, "source_samples": record.samples,
                            "rows": n_rows, "quarantined": q_table.num_rows,
                            "bytes": size, "sha256": sha})
        splits[split] = {"shards": entries, "rows": sum(e["rows"] for e in entries),
                         "quarantined": sum(e["quarantined"] for e in entries)}
    quarantine = pa.concat_tables(quarantine_tables) if quarantine_tables else QUARANTINE_SCHEMA.empty_table()
    q_url = storage.join(out_url, QUARANTINE_NAME)
    storage.write_bytes_atomic(q_url, parquet_bytes(quarantine, cfg.compression))
    q_size, q_sha = file_digest(q_url)
    manifest = {
        "kind": "token_shards",
        "schema_version": SCHEMA_VERSION,
        "inputs": {"corpus_manifest": content_digest(corpus_manifest), "tokenizer": tokenizer_digest},
        "encoding_hash": encoding_hash(tokenizer_digest, cfg.micro_batch, view),
        "tokenizer_view": view.model_dump(mode="json") if view is not None else None,
        "scales": list(first_info.scales) if first_info else [],
        "codebook_size": first_info.codebook_size if first_info else None,
        "splits": splits,
        "quarantine": {"path": QUARANTINE_NAME, "rows": quarantine.num_rows, "bytes": q_size,
                       "sha256": q_sha},
    }
    return manifest


def _parquet_rows(url: str) -> int:
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows
