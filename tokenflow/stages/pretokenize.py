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
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenflow import storage
from tokenflow.config import (DEFAULT_LIMITS, PretokenizeConfig, SampleLimitsConfig, TokenFlowConfig,
                              TokenizerView)
from tokenflow.data.manifest import MANIFEST_NAME, ShardRecord, content_digest, file_digest, shard_records
from tokenflow.data.quarantine import check_quarantine_ceiling
from tokenflow.data.shard_encoder import (SHARDS_DIR, ShardEncoder, encoding_hash, made_by, quarantine_part_url,
                                          token_shard_path, token_shard_url)
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
        import ray

        results = []
        for i in range(len(batch["split"])):
            record = ShardRecord(**{f: _scalar(batch[f][i]) for f in _RECORD_FIELDS})
            results.append(self.encoder.encode_shard(record, str(batch["split"][i])))
        columns = {k: [asdict(r)[k] for r in results] for k in asdict(results[0])}
        return {**columns, "node": [ray.get_runtime_context().get_node_id()] * len(results)}


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
        manifest, per_node = encode_corpus(corpus_manifest, tokenizer_url, inputs["tokenizer"], out_url,
                                           cfg.pretokenize, view, cfg.limits)
        run.metrics({f"{split}/{key}": float(block[key]) for split, block in manifest["splits"].items()
                     for key in ("rows", "quarantined")})
        run.tag("tokenflow.shards_per_node", json.dumps(per_node, sort_keys=True))
        return run.finish(manifest)


def pretokenize_corpus(corpus_manifest: dict[str, Any], tokenizer_url: str, out_url: str,
                       cfg: PretokenizeConfig, view: TokenizerView | None = None,
                       limits: SampleLimitsConfig = DEFAULT_LIMITS) -> dict[str, Any]:
    """Tokenize every shard of every split of a corpus into ``out_url`` (with the tokenizer at
    ``view`` when given); writes and returns the manifest."""
    manifest, _ = encode_corpus(corpus_manifest, tokenizer_url, _tokenizer_digest(tokenizer_url), out_url, cfg, view,
                                limits)
    storage.write_json_atomic(storage.join(out_url, MANIFEST_NAME), manifest)
    return manifest


def _tokenizer_digest(tokenizer_url: str) -> str:
    from tokenflow.models.weights import file_sha256

    return file_sha256(storage.local_path(tokenizer_url))


class PretokenizeAttemptsExhausted(RuntimeError):
    """Every attempt of the stage lost an actor, worker or node."""


def _lost_to_the_cluster(exc: BaseException) -> bool:
    """True for the failures a re-run can get past: a dead actor, worker process, node or
    object, or a process the memory monitor killed (not an error raised by the data or the code,
    nor an actor whose constructor raised)."""
    from ray.exceptions import (NodeDiedError, ObjectLostError, OutOfMemoryError, RayActorError,
                                WorkerCrashedError)

    if isinstance(exc, RayActorError) and getattr(exc, "actor_init_failed", False):
        return False  # the tokenizer actor's constructor raised: the same error again on a re-run
    return isinstance(exc, (RayActorError, NodeDiedError, ObjectLostError, OutOfMemoryError, WorkerCrashedError))


def encode_corpus(corpus_manifest: dict[str, Any], tokenizer_url: str, tokenizer_digest: str, out_url: str,
                  cfg: PretokenizeConfig, view: TokenizerView | None = None,
                  limits: SampleLimitsConfig = DEFAULT_LIMITS) -> tuple[dict[str, Any], dict[str, int]]:
    """Encode every shard not yet encoded with the tokenizer export at ``tokenizer_url`` (sha256
    ``tokenizer_digest``), then reconcile them all; returns the manifest (not yet written) and
    how many shards each Ray node encoded in the attempt that completed.

    Actors are spread over the nodes. Within an attempt Ray restarts an actor whose process or
    node died and retries its shard, each a bounded number of times (``max_actor_restarts``,
    ``max_task_retries``); an attempt that still ends with a lost actor, worker or node is run
    again for the shards not yet written, at most ``max_attempts`` times in all."""
    items = [{"split": split, **asdict(r)} for split in corpus_manifest["splits"]
             for r in shard_records(corpus_manifest, split)]
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            per_node = _encode_attempt(items, tokenizer_url, tokenizer_digest, out_url, cfg, view, limits)
            break
        except Exception as exc:
            if not _lost_to_the_cluster(exc):
                raise
            if attempt == cfg.max_attempts:
                raise PretokenizeAttemptsExhausted(
                    f"pretokenize lost its actors in each of {attempt} attempts (pretokenize.max_attempts); "
                    f"the last loss: {type(exc).__name__}: {exc}") from exc
            log.warning("pretokenize attempt %d of %d lost an actor, worker or node (%s: %s); the shards not "
                        "yet written run again in %.0fs", attempt, cfg.max_attempts, type(exc).__name__,
                        str(exc).splitlines()[0], cfg.retry_wait_s)
            time.sleep(cfg.retry_wait_s)
    return finalize(corpus_manifest, out_url, tokenizer_digest, cfg, view, limits), per_node


def _unwritten(items: list[dict[str, Any]], out_url: str, tokenizer_digest: str, cfg: PretokenizeConfig,
               view: TokenizerView | None, limits: SampleLimitsConfig) -> list[dict[str, Any]]:
    """The shards without a token shard yet. One listing of the output; the token shards found
    there (written atomically, so complete) must come from this encoding of their source shard:
    their footers are read in parallel, and a shard made from other inputs is refused."""
    written = {f"{SHARDS_DIR}/{rel}" for rel in storage.file_sizes(storage.join(out_url, SHARDS_DIR))}
    paths = [token_shard_path(item["split"], item["name"]) for item in items]
    found = [(item, storage.join(out_url, path)) for item, path in zip(items, paths) if path in written]
    wanted = encoding_hash(tokenizer_digest, cfg.micro_batch, view, limits)
    with ThreadPoolExecutor(min(32, max(1, len(found)))) as pool:
        for (item, url), info in zip(found, pool.map(read_shard_info, [url for _, url in found])):
            if not made_by(info, tokenizer_digest, wanted, item["name"], item["sha256"]):
                raise TokenShardError(f"{url} exists but was made from other inputs ({info}); refusing to mix "
                                      "encodings in one output")
    return [item for item, path in zip(items, paths) if path not in written]


def _encode_attempt(items: list[dict[str, Any]], tokenizer_url: str, tokenizer_digest: str, out_url: str,
                    cfg: PretokenizeConfig, view: TokenizerView | None, limits: SampleLimitsConfig) -> dict[str, int]:
    """One run of the actor pool over the shards not yet written (none started when every shard
    is); the number of shards each node encoded."""
    import ray

    gpus = _resolve_gpus(cfg)
    if removed := storage.remove_stale_temps(out_url):
        log.info("removed %d temp files left by an interrupted run", removed)
    pending = _unwritten(items, out_url, tokenizer_digest, cfg, view, limits)
    if not pending:
        log.info("pretokenize: all %d shards already encoded", len(items))
        return {}
    start = time.perf_counter()
    ds = ray.data.from_items(pending, override_num_blocks=len(pending)).map_batches(
        _EncoderActor,
        fn_constructor_kwargs=dict(
            tokenizer_url=tokenizer_url, out_url=out_url, batch_size=cfg.batch_size,
            micro_batch=cfg.micro_batch, limits=limits,
            compression=cfg.compression, allow_tf32=cfg.allow_tf32, use_gpu=gpus > 0, view=view,
            decode_threads=max(1, int(cfg.cpus_per_actor))),
        batch_size=1,
        # One shard queued per actor: a shard is long work, and a second one queued at an actor
        # (Ray Data's default) can wait there while another actor has none.
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus,
        scheduling_strategy="SPREAD",
        max_restarts=cfg.max_actor_restarts,
        max_task_retries=cfg.max_task_retries,
    )
    try:
        results = ds.take_all()
    finally:
        # Ray Data releases the actor pool when its executor is collected; a reference cycle can
        # keep it (and its CPUs or GPUs) until the next garbage collection, and a training stage
        # (or the next attempt) that needs those resources would wait for them forever (seen in CI).
        del ds
        gc.collect()
    elapsed = time.perf_counter() - start
    done = [r for r in results if not r["skipped"]]
    per_node: dict[str, int] = {}
    for r in done:
        per_node[r["node"]] = per_node.get(r["node"], 0) + 1
    rows = sum(r["rows"] for r in done)
    log.info("pretokenize: %d shards encoded (%d already done), %d samples in %.1fs (%.1f samples/s), "
             "%d quarantined", len(done), len(items) - len(done), rows, elapsed,
             rows / max(elapsed, 1e-9), sum(r["quarantined"] for r in done))
    return per_node


def finalize(corpus_manifest: dict[str, Any], out_url: str, tokenizer_digest: str,
             cfg: PretokenizeConfig, view: TokenizerView | None = None,
             limits: SampleLimitsConfig = DEFAULT_LIMITS) -> dict[str, Any]:
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
            path = token_shard_path(split, record.name)
            entries.append({"name": storage.basename(path), "path": path,
                            "source": record.name, "source_samples": record.samples,
                            "rows": n_rows, "quarantined": q_table.num_rows,
                            "bytes": size, "sha256": sha})
        splits[split] = {"shards": entries, "rows": sum(e["rows"] for e in entries),
                         "quarantined": sum(e["quarantined"] for e in entries)}
    quarantine = pa.concat_tables(quarantine_tables) if quarantine_tables else QUARANTINE_SCHEMA.empty_table()
    q_url = storage.join(out_url, QUARANTINE_NAME)
    storage.write_bytes_atomic(q_url, parquet_bytes(quarantine, cfg.compression))  # kept for a look when refused
    check_quarantine_ceiling(quarantine, sum(r.samples for split in corpus_manifest["splits"]
                                              for r in shard_records(corpus_manifest, split)),
                             limits.max_quarantine_fraction, out_url)
    q_size, q_sha = file_digest(q_url)
    manifest = {
        "kind": "token_shards",
        "schema_version": SCHEMA_VERSION,
        "inputs": {"corpus_manifest": content_digest(corpus_manifest), "tokenizer": tokenizer_digest},
        "encoding_hash": encoding_hash(tokenizer_digest, cfg.micro_batch, view, limits),
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
