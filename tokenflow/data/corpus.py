"""Corpus readers: webdataset tar shards and Parquet image tables, through fsspec.

Both formats yield :class:`RawSample` records with the undecoded image bytes; decoding happens
downstream so that a bad image becomes a quarantine record, not a crash. A sample the reader
cannot use as stored (no image member, a duplicate key, an unreadable tail of a tar) carries a
``problem`` reason instead of image bytes. :class:`ReaderOptions` says where a corpus keeps its
text and which Parquet columns hold what.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from tokenflow import storage
from tokenflow.config import CorpusConfig
from tokenflow.data.sample_json import SampleJSONError, parse_sample_json

if TYPE_CHECKING:
    from tokenflow.data.manifest import ShardRecord

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
ShardFormat = Literal["webdataset", "parquet"]
ListingFormat = Literal["auto", "webdataset", "parquet"]
_EXTENSIONS: dict[ShardFormat, str] = {"webdataset": ".tar", "parquet": ".parquet"}


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


@dataclass(frozen=True)
class ReaderOptions:
    """How a corpus's shards are read. ``format`` None: each shard's from its extension."""

    format: ShardFormat | None = None
    caption_json_key: str | None = "caption"  # webdataset: the .json field a sample without .txt takes
    key_column: str | None = "key"  # parquet; None: keys are '<shard stem>-<row index>'
    image_column: str = "image"  # binary, or a struct with a 'bytes' field
    caption_column: str | None = "caption"  # None: no captions
    metadata_column: str | None = "json"  # read when the table has it

    @classmethod
    def from_config(cls, cfg: CorpusConfig, listed: ShardFormat | None = None) -> ReaderOptions:
        """The options of a corpus config; ``listed`` is the format :func:`resolve_listing` found,
        for ``format: auto``. LLaVA data is packed into Parquet shards with the default columns."""
        if cfg.format == "llava":
            return cls(format="parquet")
        c = cfg.columns
        return cls(format=listed if cfg.format == "auto" else cfg.format,
                   caption_json_key=cfg.webdataset.caption_json_key, key_column=c.key, image_column=c.image,
                   caption_column=c.caption, metadata_column=c.metadata)


DEFAULT = ReaderOptions(caption_json_key=None)  # corpora indexed before reader options: .txt captions only


def shard_format(url: str) -> ShardFormat:
    """The format of a shard, from its extension."""
    name = storage.basename(url).lower()
    if name.endswith(".tar"):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    raise CorpusError(f"{url}: unknown shard format (expected .tar or .parquet)")


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def _candidates(url: str) -> tuple[list[str], bool]:
    """Paths under ``url`` (a glob's matches, a directory's files outside folders named ``_*`` or
    ``.*``, or the file itself) and whether ``url`` named one file."""
    fs, path = storage.filesystem(url)
    if any(ch in path for ch in "*?["):
        return sorted(fs.glob(path)), False
    if fs.isdir(path):
        root = path.rstrip("/") + "/"
        return sorted(p for p in fs.find(path)
                      if not any(_hidden(part) for part in p[len(root):].split("/")[:-1])), False
    if fs.exists(path):
        return [path], True
    raise CorpusError(f"{url}: no such file or directory")


def _stem(path: str) -> str:
    return posixpath.splitext(path)[0]


def _select(url: str, paths: list[str], format: ListingFormat) -> tuple[ShardFormat, list[str]]:
    """The shards among ``paths`` and their format. ``auto``: .tar files are webdataset, .parquet
    files named like a tar beside it are img2dataset's side files (not shards)."""
    tars = [p for p in paths if p.lower().endswith(".tar")]
    tables = [p for p in paths if p.lower().endswith(".parquet")]
    if format != "auto":
        found = tars if format == "webdataset" else tables
        if not found:
            raise CorpusError(f"{url}: no {_EXTENSIONS[format]} shards found (format {format})")
        return format, found
    tar_stems = {_stem(p) for p in tars}
    tables = [p for p in tables if _stem(p) not in tar_stems]
    if tars and tables:
        raise CorpusError(f"{url}: mixes webdataset and parquet shards; use one format per corpus")
    if not (tars or tables):
        raise CorpusError(f"{url}: no .tar or .parquet shards found")
    return ("webdataset", tars) if tars else ("parquet", tables)


def resolve_listing(url: str, format: ListingFormat = "auto") -> tuple[ShardFormat, list[str]]:
    """The format and shard URLs under ``url``: a directory (its .tar/.parquet files, sorted), a
    glob, or one file. Files (and a directory's folders) whose names start with ``_`` or ``.`` are
    not shards: that is where stage outputs keep their manifests and digests."""
    paths, single = _candidates(url)
    if single:
        fmt = shard_format(paths[0])
        if format not in ("auto", fmt):
            raise CorpusError(f"{url}: a {fmt} shard, but the corpus format is {format}")
    else:
        paths = [p for p in paths if not _hidden(storage.basename(p))]
        fmt, paths = _select(url, paths, format)
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    return fmt, [p if "://" in p or not protocol else protocol + p for p in paths]


def list_shards(url: str, format: ListingFormat = "auto") -> list[str]:
    """The shard URLs of :func:`resolve_listing`."""
    return resolve_listing(url, format)[1]


def img2dataset_status(tar_urls: list[str]) -> dict[str, int]:
    """Summed ``status`` counts (success, failed_to_download, ...) of the img2dataset side
    Parquet files beside ``tar_urls`` (none: empty)."""
    counts: Counter[str] = Counter()
    for tar in tar_urls:
        side = _stem(tar) + ".parquet"
        if not storage.exists(side):
            continue
        try:
            status = pq.read_table(io.BytesIO(storage.read_bytes(side)), columns=["status"]).column("status")
        except (pa.ArrowException, OSError) as exc:
            raise CorpusError(f"{side}: not an img2dataset side file with a status column: {exc}") from exc
        counts.update(str(v) for v in status.to_pylist() if v is not None)
    return dict(sorted(counts.items()))


def shard_listing(url: str, format: ListingFormat = "auto") -> dict[str, str]:
    """``{shard URL: size and version}`` of the shards under ``url``, from file metadata only
    (ETag, else modification time): it changes when a shard is replaced, added or removed, without
    reading any shard."""
    fs, _ = storage.filesystem(url)
    out = {}
    for shard in list_shards(url, format):
        info = fs.info(storage.filesystem(shard)[1])
        out[shard] = f"{info.get('size')}:{storage.object_version(info)}"
    return out


def corpus_listing(urls: list[str], format: ListingFormat = "auto") -> dict[str, str]:
    """:func:`shard_listing` of every corpus location in ``urls`` together, listing failures as
    :class:`CorpusError`."""
    listing: dict[str, str] = {}
    for url in urls:
        try:
            listing.update(shard_listing(url, format))
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


def _json_caption(data: bytes | None, field: str | None) -> str | None:
    """The string under ``field`` of a sample's .json member; None when there is none (no
    member, not a JSON object within the sample limits, not a string there)."""
    if data is None or field is None:
        return None
    try:
        record = parse_sample_json(data)
    except SampleJSONError:
        return None
    value = record.get(field) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _tar_samples(url: str, f: BinaryIO, reader: ReaderOptions) -> Iterator[RawSample]:
    seen: set[str] = set()
    current: dict[str, bytes] = {}
    key: str | None = None

    def finish() -> RawSample:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in current), None)
        problem = None if image_ext else "missing_image"
        if key in seen:
            problem = "duplicate_key"
        seen.add(key)
        caption = _decode_text(current.get("txt"))
        return RawSample(
            key=key,
            image=current.get(image_ext) if image_ext and not problem else None,
            caption=caption if caption is not None else _json_caption(current.get("json"), reader.caption_json_key),
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


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t)


def _is_image(t: pa.DataType) -> bool:
    """Binary, or a struct with a binary ``bytes`` field (the Hugging Face ``Image`` feature)."""
    if pa.types.is_struct(t):
        index = t.get_field_index("bytes")
        return index >= 0 and _is_binary(t.field(index).type)
    return _is_binary(t)


def _parquet_columns(url: str, schema: pa.Schema, reader: ReaderOptions) -> list[str]:
    """The columns to read; :class:`CorpusError` for a configured column the file lacks or one
    of the wrong type."""
    names = schema.names
    required = [c for c in (reader.key_column, reader.image_column, reader.caption_column) if c is not None]
    if missing := [c for c in required if c not in names]:
        raise CorpusError(f"{url}: no column {', '.join(map(repr, missing))} (the file has {names}; "
                          "set the corpus's columns)")
    metadata = [reader.metadata_column] if reader.metadata_column in names else []
    typed = [(reader.image_column, _is_image, "binary or struct<bytes: binary>"),
             *((c, _is_text, "string") for c in (reader.caption_column, *metadata) if c is not None)]
    for column, fits, wanted in typed:
        if not fits(kind := schema.field(column).type):
            raise CorpusError(f"{url}: column {column!r} is {kind}, not {wanted}")
    return list(dict.fromkeys([*required, *metadata]))


def _image_bytes(value: bytes | dict | None) -> bytes | None:
    """A binary cell's bytes, or a struct cell's ``bytes`` field."""
    return value.get("bytes") if isinstance(value, dict) else value


def _parquet_samples(url: str, f: BinaryIO, reader: ReaderOptions, batch_rows: int = 256) -> Iterator[RawSample]:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as exc:  # not Parquet, or its footer is damaged
        yield _unreadable(url, "parquet", exc)
        return
    columns = _parquet_columns(url, pf.schema_arrow, reader)
    stem = _stem(storage.basename(url))
    seen: set[str] = set()
    row = 0
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
        for i in range(batch.num_rows):
            key = rows[reader.key_column][i] if reader.key_column else f"{stem}-{row}"
            image = _image_bytes(rows[reader.image_column][i])
            problem = None
            if key is None:
                key, problem = f"{storage.basename(url)}#row{len(seen)}", "missing_key"
            elif key in seen:
                problem = "duplicate_key"
            elif image is None:
                problem = "missing_image"
            seen.add(key)
            row += 1
            yield RawSample(
                key=str(key),
                image=None if problem else bytes(image),
                caption=rows[reader.caption_column][i] if reader.caption_column else None,
                json=rows[reader.metadata_column][i] if reader.metadata_column in rows else None,
                problem=problem,
            )


def shard_samples(url: str, data: bytes, reader: ReaderOptions = DEFAULT) -> Iterator[RawSample]:
    """Every sample of a shard's bytes, in stored order (``url`` gives the format and names the
    records of what could not be read)."""
    fmt = shard_format(url)
    if reader.format not in (None, fmt):
        raise CorpusError(f"{url}: a {fmt} shard, but the corpus is read as {reader.format}")
    webdataset = fmt == "webdataset"
    if not data:
        return iter([_unreadable(url, "tar" if webdataset else "parquet", EOFError("the shard is an empty file"))])
    f = io.BytesIO(data)
    return _tar_samples(url, f, reader) if webdataset else _parquet_samples(url, f, reader)


def iter_shard(url: str, sha256: str | None = None, reader: ReaderOptions = DEFAULT) -> Iterator[RawSample]:
    """Every sample of one shard, in stored order. The shard is read whole first; given its
    ``sha256`` from the corpus manifest, a shard whose bytes changed since the corpus was indexed
    raises :class:`SourceChangedError` before any sample is read (old and new never mix)."""
    data = storage.read_bytes(url)
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise SourceChangedError(f"{url} changed since the corpus was indexed (sha256 {actual[:12]}, the corpus "
                                 f"manifest has {sha256[:12]}); re-run the pipeline: the corpus stage re-indexes "
                                 "the changed shards and the stages after it run again")
    return shard_samples(url, data, reader)


def iter_record(record: ShardRecord) -> Iterator[RawSample]:
    """:func:`iter_shard` of an indexed shard: its URL, digest and the corpus's reader options."""
    return iter_shard(record.url, record.sha256, record.reader)
