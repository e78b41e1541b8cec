"""Corpus manifests: which shards a corpus has, how many samples each, and their digests.

A manifest is plain JSON with sorted keys; its digest (sha256 of the canonical JSON) identifies
the corpus in every downstream stage's hash.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

from tokenflow import storage
from tokenflow.config import config_hash
from tokenflow.data.corpus import iter_shard, shard_format

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


def index_shard(url: str) -> ShardRecord:
    """Count and digest one shard (reads it fully)."""
    samples = unusable = 0
    for sample in iter_shard(url):
        samples += 1
        unusable += sample.problem is not None
    size, sha = file_digest(url)
    return ShardRecord(url=url, name=storage.basename(url), format=shard_format(url),
                       samples=samples, unusable=unusable, bytes=size, sha256=sha)


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


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Stable digest of a manifest's content."""
    return config_hash(manifest)


def shard_records(manifest: dict[str, Any], split: str) -> list[ShardRecord]:
    """The shard records of one split of a corpus manifest."""
    try:
        return [ShardRecord(**r) for r in manifest["splits"][split]["shards"]]
    except KeyError as exc:
        raise ValueError(f"corpus manifest has no split {split!r}") from exc
