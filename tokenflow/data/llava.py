"""LLaVA-style instruction data packed into Parquet corpus shards.

The source is one JSON file: a list of ``{"id", "image", "conversations": [{"from": "human" |
"gpt", "value"}, ...]}`` records, ``image`` a path relative to an image root (no ``image``: a
text-only record). Records with an image become rows of standard Parquet shards (``key``,
``image``, ``caption`` null, ``json`` holding ``{"id", "image", "conversations"}``) that the
corpus reader reads like any other. An image file that does not exist becomes a row with a null
image (the reader flags it ``missing_image`` and pre-tokenization quarantines it); text-only and
invalid records are counted, not written.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pyarrow as pa

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig
from tokenflow.data.corpus import CorpusError
from tokenflow.data.sample_json import SampleJSONError, parse_sample_json
from tokenflow.data.token_shards import parquet_bytes

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("json", pa.string())])
READ_THREADS = 16  # image reads in flight per shard (object stores answer each in tens of ms)


def _problem(record: dict[str, Any]) -> str | None:
    """Why a record cannot be packed, or None."""
    id_ = record.get("id")
    if isinstance(id_, bool) or not isinstance(id_, (str, int)):
        return "no string or integer id"
    if not isinstance(record.get("conversations"), list):
        return "no conversations list"
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image.strip("/")
                                  and ".." not in posixpath.normpath(image).split("/")):
        return "image is not a relative file path"
    return None


def _checked(record: dict[str, Any], limits: SampleLimitsConfig) -> dict[str, Any]:
    """``{"id", "image", "json"}`` of a packable record, else ``{"invalid": reason}`` (metadata
    past ``limits`` would be refused downstream, so it is refused here)."""
    if problem := _problem(record):
        return {"invalid": problem}
    text = json.dumps({k: record.get(k) for k in ("id", "image", "conversations")}, ensure_ascii=False)
    try:
        parse_sample_json(text, limits)
    except SampleJSONError as exc:
        return {"invalid": exc.reason}
    return {"id": str(record["id"]), "image": record.get("image"), "json": text}


def _unique_keys(ids: list[str]) -> Iterator[str]:
    """``ids`` made unique in order: a repeated id gets ``#2``, ``#3``, ..."""
    used: set[str] = set()
    seen: Counter[str] = Counter()
    for id_ in ids:
        seen[id_] += 1
        key = id_ if seen[id_] == 1 else f"{id_}#{seen[id_]}"
        while key in used:
            seen[id_] += 1
            key = f"{id_}#{seen[id_]}"
        used.add(key)
        yield key


def _load(json_url: str) -> list[dict[str, Any]]:
    """The JSON list of objects at ``json_url``; :class:`CorpusError` for anything else."""
    try:
        data = json.loads(storage.read_bytes(json_url))
    except FileNotFoundError:
        raise CorpusError(f"{json_url}: no such file (the corpus's LLaVA JSON)") from None
    except (ValueError, RecursionError) as exc:
        raise CorpusError(f"{json_url}: not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, list):
        raise CorpusError(f"{json_url}: a JSON {type(data).__name__}, not a list of LLaVA records")
    if (bad := next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)) is not None:
        raise CorpusError(f"{json_url}: record {bad} is a JSON {type(data[bad]).__name__}, not an object")
    return data


def llava_records(json_url: str, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[dict[str, Any]]:
    """The records of a LLaVA JSON file, in file order, as :func:`pack_llava_shard` takes them:
    ``{"id", "key", "image", "json"}`` (``image`` None: text-only, no ``key``) or ``{"invalid":
    reason}`` (no id, no conversations list, a bad image path, metadata past ``limits``). Keys
    are the ids, repeated ones suffixed ``#2``, ``#3``, ... in file order (unique in the file)."""
    records = [_checked(r, limits) for r in _load(json_url)]
    with_image = [r for r in records if r.get("image") is not None]
    for record, key in zip(with_image, _unique_keys([r["id"] for r in with_image])):
        record["key"] = key
    if invalid := Counter(r["invalid"] for r in records if "invalid" in r):
        log.warning("%s: %d of %d records are invalid and not packed: %s", json_url, sum(invalid.values()),
                    len(records), "; ".join(f"{reason} x{n}" for reason, n in invalid.most_common(5)))
    return records


def plan_llava_shards(records: list[dict[str, Any]], shard_size: int) -> list[list[dict[str, Any]]]:
    """``records`` in consecutive groups, one per shard, each with ``shard_size`` packed records
    (the last may have fewer); the records not packed (text-only, invalid) stay in the group they
    fall in, so that no shard is empty and each record is counted once."""
    groups: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    packed = 0
    for record in records:
        if "key" in record and packed == shard_size:
            groups.append(current)
            current, packed = [], 0
        current.append(record)
        packed += "key" in record
    if current and (packed or not groups):
        groups.append(current)
    elif current:
        groups[-1].extend(current)
    return groups


def _read_image(image_root: str, path: str) -> bytes | None:
    """An image file's bytes, None when it does not exist."""
    try:
        return storage.read_bytes(storage.join(image_root, path))
    except (FileNotFoundError, IsADirectoryError):
        return None


def pack_llava_shard(records: list[dict[str, Any]], image_root: str, out_url: str, name: str) -> dict[str, int]:
    """Write the records of :func:`llava_records` that have an image, with their image files read
    from ``image_root``, to ``<out_url>/<name>.parquet``; the counts: ``records`` (rows written),
    ``missing_image`` (of them, rows whose image file does not exist), ``text_only``, ``invalid``."""
    rows = [r for r in records if "invalid" not in r and r["image"] is not None]
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="llava-read") as pool:
        images = list(pool.map(lambda r: _read_image(image_root, r["image"]), rows))
    table = pa.table({"key": [r["key"] for r in rows], "image": images, "caption": [None] * len(rows),
                      "json": [r["json"] for r in rows]}, schema=SCHEMA)
    storage.write_bytes_atomic(storage.join(out_url, f"{name}.parquet"), parquet_bytes(table))
    invalid = sum("invalid" in r for r in records)
    return {"records": len(rows), "missing_image": images.count(None), "text_only": len(records) - invalid - len(rows),
            "invalid": invalid}
