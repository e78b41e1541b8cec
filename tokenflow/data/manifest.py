"""Manifests: the file every stage output writes last (its presence means complete), and the
corpus manifest (which shards a corpus has, how many samples each, and their digests).

A manifest is plain JSON with sorted keys; its digest (sha256 of the canonical JSON) identifies
the corpus to every downstream stage.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from tokenflow import storage
from tokenflow.config import config_hash
from tokenflow.data.corpus import shard_format, shard_samples

MANIFEST_NAME = "_MANIFEST.json"
LEASE_NAME = "_LEASE.json"  # a stage output's lease (tokenflow.workflow.lease) and its .lock: never part of it
CORPUS_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardRecord:
    """One indexed corpus shard."""

    url: str
    name: str
    format: str
    samples: int
    unusable: int  # samples the reader already flags (missing image, duplicate key, ...)
    bytes: int
    sha256: str


def file_digest(url: str, chunk: int = 1 << 20) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file at any fsspec URL."""
    fs, path = storage.filesystem(url)
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def directory_digests(url: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under a directory URL."""
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    return {path[len(root) + 1 :]: file_digest(storage.join(url, path[len(root) + 1 :]))[1]
            for path in sorted(fs.find(root))}


def index_shard(url: str) -> ShardRecord:
    """Count and digest one shard (one read: the counts and the digest are of the same bytes)."""
    data = storage.read_bytes(url)
    samples = unusable = 0
    for sample in shard_samples(url, data):
        samples += 1
        unusable += sample.problem is not None
    return ShardRecord(url=url, name=storage.basename(url), format=shard_format(url),
                       samples=samples, unusable=unusable, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def corpus_manifest(splits: dict[str, list[ShardRecord]], source: dict[str, Any]) -> dict[str, Any]:
    """Assemble a corpus manifest from indexed shards per split (e.g. train, heldout)."""
    for split, records in splits.items():
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            raise ValueError(f"split {split!r}: shard names must be unique (token shards are named after them)")
    return {
        "kind": "corpus",
        "version": CORPUS_MANIFEST_VERSION,
        "source": source,
        "splits": {
            split: {
                "shards": [asdict(r) for r in records],
                "samples": sum(r.samples for r in records),
                "bytes": sum(r.bytes for r in records),
            }
            for split, records in splits.items()
        },
    }


# What a manifest records about the run that made it, not about what it made.
RUN_FIELDS = ("mlflow_run_id", "config_hash", "inputs")


def content_digest(manifest: dict[str, Any]) -> str:
    """Digest of what a stage output holds (its manifest without :data:`RUN_FIELDS`): a stage
    that re-runs and makes the same output keeps it, so its dependants stay cached."""
    return config_hash({k: v for k, v in manifest.items() if k not in RUN_FIELDS})


def shard_records(manifest: dict[str, Any], split: str) -> list[ShardRecord]:
    """The shard records of one split of a corpus manifest."""
    try:
        return [ShardRecord(**r) for r in manifest["splits"][split]["shards"]]
    except KeyError as exc:
        raise ValueError(f"corpus manifest has no split {split!r}") from exc
