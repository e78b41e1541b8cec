"""Manifests: the file every stage output writes last (its presence means complete), and the
corpus manifest (which shards a corpus has, how many samples each, their digests, and how they
are read).

A manifest is plain JSON with sorted keys; its digest (sha256 of the canonical JSON) identifies
the corpus to every downstream stage.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tokenflow import storage
from tokenflow.config import config_hash
from tokenflow.data.corpus import DEFAULT, ReaderOptions, iter_record, shard_format, shard_samples

MANIFEST_NAME = "_MANIFEST.json"
LEASE_NAME = "_LEASE.json"  # a stage output's lease (tokenflow.workflow.lease) and its .lock: never part of it
CORPUS_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardRecord:
    """One indexed corpus shard and how its corpus is read (``reader``: the manifest's one
    ``reader`` block, not written per shard; given as a dict it is converted)."""

    url: str
    name: str
    format: str
    samples: int
    unusable: int  # samples the reader already flags (missing image, duplicate key, ...)
    bytes: int
    sha256: str
    reader: ReaderOptions = field(default=DEFAULT)

    def __post_init__(self) -> None:
        if isinstance(self.reader, dict):  # asdict() of a record, e.g. through a Ray Data row
            object.__setattr__(self, "reader", ReaderOptions(**self.reader))

    def manifest_entry(self) -> dict[str, Any]:
        """The record as the corpus manifest lists it (without ``reader``)."""
        return {k: v for k, v in asdict(self).items() if k != "reader"}


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


def _digest_parquet(keys: list[str], digests: list[str]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"key": pa.array(keys, pa.string()), "image_sha256": pa.array(digests, pa.string())}),
                   sink, compression="zstd")
    return sink.getvalue()


def index_shard(url: str, reader: ReaderOptions = DEFAULT, digests_url: str | None = None) -> ShardRecord:
    """Count and digest one shard read with ``reader`` (one read: the counts and the digest are
    of the same bytes); a Parquet shard without a configured column raises :class:`CorpusError`.
    With ``digests_url``, the sha256 of every sample's image bytes is written there as a Parquet
    table (``key``, ``image_sha256``; samples with an image), for deduplication across corpora."""
    data = storage.read_bytes(url)
    samples = unusable = 0
    keys, digests = [], []
    for sample in shard_samples(url, data, reader):
        samples += 1
        unusable += sample.problem is not None
        if digests_url is not None and sample.problem is None:
            keys.append(sample.key)
            digests.append(hashlib.sha256(sample.image).hexdigest())
    if digests_url is not None:
        storage.write_bytes_atomic(digests_url, _digest_parquet(keys, digests))
    return ShardRecord(url=url, name=storage.basename(url), format=shard_format(url), samples=samples,
                       unusable=unusable, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), reader=reader)


def corpus_manifest(splits: dict[str, list[ShardRecord]], source: dict[str, Any],
                    reader: ReaderOptions = DEFAULT) -> dict[str, Any]:
    """Assemble a corpus manifest from shards per split (e.g. train, heldout) indexed with ``reader``."""
    for split, records in splits.items():
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            raise ValueError(f"split {split!r}: shard names must be unique (token shards are named after them)")
        if other := next((r for r in records if r.reader != reader), None):
            raise ValueError(f"split {split!r}: {other.name} was indexed with other reader options than the corpus's")
    return {
        "kind": "corpus",
        "version": CORPUS_MANIFEST_VERSION,
        "source": source,
        "reader": asdict(reader),
        "splits": {
            split: {
                "shards": [r.manifest_entry() for r in records],
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


DIGESTS_DIR = "_digests"  # a corpus output's per-shard image digests: _digests/<split>/<shard name>.parquet


def digests_url(corpus_url: str, split: str, shard_name: str) -> str:
    """Where the corpus stage writes a shard's per-sample image digests."""
    return storage.join(corpus_url, DIGESTS_DIR, split, f"{shard_name}.parquet")


_WHOLE_SHARD_READS = threading.BoundedSemaphore(2)  # sample_digests' fallback, process-wide


def sample_digests(corpus_url: str, split: str, record: ShardRecord) -> list[tuple[str, str]]:
    """``(key, image sha256)`` of the shard's samples with an image, in order: from the corpus
    stage's digest file, else (a corpus indexed without them) from the shard itself."""
    url = digests_url(corpus_url, split, record.name)
    if storage.exists(url):
        cols = pq.read_table(io.BytesIO(storage.read_bytes(url))).to_pydict()
        return list(zip(cols["key"], cols["image_sha256"]))
    with _WHOLE_SHARD_READS:  # callers read digests many shards at a time; image shards are large
        return [(s.key, hashlib.sha256(s.image).hexdigest()) for s in iter_record(record) if s.problem is None]


def manifest_reader(manifest: dict[str, Any]) -> ReaderOptions:
    """A corpus manifest's reader options (:data:`DEFAULT` for manifests written before them)."""
    return ReaderOptions(**manifest["reader"]) if "reader" in manifest else DEFAULT


def shard_records(manifest: dict[str, Any], split: str) -> list[ShardRecord]:
    """The shard records of one split of a corpus manifest, each with the manifest's reader."""
    reader = manifest_reader(manifest)
    try:
        return [ShardRecord(**r, reader=reader) for r in manifest["splits"][split]["shards"]]
    except KeyError as exc:
        raise ValueError(f"corpus manifest has no split {split!r}") from exc
