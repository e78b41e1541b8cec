"""Corpus readers: webdataset tar shards and Parquet image tables, through fsspec.

Both formats yield :class:`RawSample` records with the undecoded image bytes; decoding happens
downstream so that a bad image becomes a quarantine record, not a crash. A sample the reader
cannot use as stored (no image member, a duplicate key, an unreadable tail of a tar) carries a
``problem`` reason instead of image bytes.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from tokenflow import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PARQUET_COLUMNS = ("key", "image", "caption")
ShardFormat = Literal["webdataset", "parquet"]


class SourceChangedError(RuntimeError):
    """A corpus shard's bytes differ from the digest its corpus manifest recorded."""


class CorpusError(ValueError):
    """A corpus that cannot be read as one of the supported formats."""


@dataclass(frozen=True)
class RawSample:
    """One corpus sample as stored: image bytes undecoded, text fields as strings."""

    key: str
    image: bytes | None
    caption: str | None = None
    json: str | None = None
    problem: str | None = None


def shard_format(url: str) -> ShardFormat:
    """The format of a shard, from its extension."""
    name = storage.basename(url).lower()
    if name.endswith(".tar"):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    raise CorpusError(f"{url}: unknown shard format (expected .tar or .parquet)")


def list_shards(url: str) -> list[str]:
    """Shard URLs under ``url``: a directory (every .tar/.parquet, sorted), a glob, or one file."""
    fs, path = storage.filesystem(url)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    if any(ch in path for ch in "*?["):
        paths = sorted(fs.glob(path))
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if p.lower().endswith((".tar", ".parquet"))
                       and not storage.basename(p).startswith(("_", ".")))
    elif fs.exists(path):
        paths = [path]
    else:
        raise CorpusError(f"{url}: no such file or directory")
    if not paths:
        raise CorpusError(f"{url}: no .tar or .parquet shards found")
    urls = [p if "://" in p or not protocol else protocol + p for p in paths]
    formats = {shard_format(u) for u in urls}
    if len(formats) > 1:
        raise CorpusError(f"{url}: mixes webdataset and parquet shards; use one format per corpus")
    return urls


def shard_listing(url: str) -> dict[str, str]:
    """``{shard URL: size and version}`` of the shards under ``url``, from file metadata only
    (ETag, else modification time): it changes when a shard is replaced, added or removed, without
    reading any shard."""
    fs, _ = storage.filesystem(url)
    out = {}
    for shard in list_shards(url):
        info = fs.info(storage.filesystem(shard)[1])
        out[shard] = f"{info.get('size')}:{storage.object_version(info)}"
    return out


def corpus_listing(urls: list[str]) -> dict[str, str]:
    """:func:`shard_listing` of every corpus location in ``urls`` together, listing failures as
    :class:`CorpusError`."""
    listing: dict[str, str] = {}
    for url in urls:
        try:
            listing.update(shard_listing(url))
        except CorpusError:
            raise
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise many types
            raise CorpusError(f"cannot list the corpus at {url} (its shards identify the corpus stage): "
                              f"{type(exc).__name__}: {exc}") from exc
    return listing


def _decode_text(data: bytes | None) -> str | None:
    if data is None:
        return None
    return data.decode("utf-8", errors="replace")


def _unreadable(url: str, container: str, exc: Exception) -> RawSample:
    """The one record standing for the rest of a shard that could not be read."""
    detail = str(exc).split(" @ ", 1)[0]  # webdataset appends the file object's repr
    return RawSample(key=f"{storage.basename(url)}#unreadable", image=None,
                     problem=f"unreadable_{container}: {type(exc).__name__}: {detail}")


def _tar_samples(url: str, f: BinaryIO) -> Iterator[RawSample]:
    seen: set[str] = set()
    current: dict[str, bytes] = {}
    key: str | None = None

    def finish() -> RawSample:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in current), None)
        problem = None if image_ext else "missing_image"
        if key in seen:
            problem = "duplicate_key"
        seen.add(key)
        return RawSample(
            key=key,
            image=current.get(image_ext) if image_ext and not problem else None,
            caption=_decode_text(current.get("txt")),
            json=_decode_text(current.get("json")),
            problem=problem,
        )

    try:
        for member in tar_file_iterator(f):
            prefix, suffix = base_plus_ext(member["fname"])
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield finish()
                key, current = prefix, {}
            current.setdefault(suffix.lower(), member["data"])
    except (tarfile.TarError, EOFError, OSError) as exc:
        if key is not None:
            yield finish()
            key = None
        yield _unreadable(url, "tar", exc)
    if key is not None:
        yield finish()


def _parquet_samples(url: str, f: BinaryIO, batch_rows: int = 256) -> Iterator[RawSample]:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:  # not Parquet, or its footer is damaged
        yield _unreadable(url, "parquet", exc)
        return
    names = set(pf.schema_arrow.names)
    missing = [c for c in PARQUET_COLUMNS if c not in names]
    if missing:
        raise CorpusError(f"{url}: parquet corpus is missing columns {missing} "
                          f"(needs key, image, caption; optional json)")
    columns = [*PARQUET_COLUMNS, *(["json"] if "json" in names else [])]
    seen: set[str] = set()
    batches = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:  # a damaged row group: the rest of the file
            yield _unreadable(url, "parquet", exc)
            return
        if batch is None:
            return
        rows = batch.to_pydict()
        for i, key in enumerate(rows["key"]):
            image = rows["image"][i]
            problem = None
            if key is None:
                key, problem = f"{storage.basename(url)}#row{len(seen)}", "missing_key"
            elif key in seen:
                problem = "duplicate_key"
            elif image is None:
                problem = "missing_image"
            seen.add(key)
            yield RawSample(
                key=str(key),
                image=None if problem else bytes(image),
                caption=rows["caption"][i],
                json=rows["json"][i] if "json" in rows else None,
                problem=problem,
            )


def shard_samples(url: str, data: bytes) -> Iterator[RawSample]:
    """Every sample of a shard's bytes, in stored order (``url`` gives the format and names the
    records of what could not be read)."""
    webdataset = shard_format(url) == "webdataset"
    if not data:
        return iter([_unreadable(url, "tar" if webdataset else "parquet", EOFError("the shard is an empty file"))])
    f = io.BytesIO(data)
    return _tar_samples(url, f) if webdataset else _parquet_samples(url, f)


def iter_shard(url: str, sha256: str | None = None) -> Iterator[RawSample]:
    """Every sample of one shard, in stored order. The shard is read whole first; given its
    ``sha256`` from the corpus manifest, a shard whose bytes changed since the corpus was indexed
    raises :class:`SourceChangedError` before any sample is read (old and new never mix)."""
    data = storage.read_bytes(url)
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise SourceChangedError(f"{url} changed since the corpus was indexed (sha256 {actual[:12]}, the corpus "
                                 f"manifest has {sha256[:12]}); re-run the pipeline: the corpus stage re-indexes "
                                 "the changed shards and the stages after it run again")
    return shard_samples(url, data)
