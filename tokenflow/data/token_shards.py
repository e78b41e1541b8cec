"""Token shards: Parquet files of token indices, one per corpus shard.

| column       | type                                      |
|--------------|-------------------------------------------|
| key          | string                                    |
| tokens       | list<uint16> (list<uint32> when K > 65536) |
| caption      | string, nullable                          |
| json         | string, nullable                          |
| image_sha256 | string                                    |

Tokens are scale-major, each scale row-major. The file's key-value metadata holds
:class:`TokenShardInfo` under ``tokenflow`` as canonical JSON.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenflow import storage

SCHEMA_VERSION = 1
METADATA_KEY = b"tokenflow"
QUARANTINE_NAME = "_QUARANTINE.parquet"
QUARANTINE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])
_ENTROPY_CODECS = ("zstd", "gzip")
_TOKENS_LEAF = "tokens.list.element"  # the Parquet leaf column of ``tokens``


class TokenShardError(ValueError):
    """A token shard that does not match the format or its manifest."""


@dataclass(frozen=True)
class TokenShardInfo:
    """What produced a token shard (stored in its Parquet metadata)."""

    scales: tuple[int, ...]
    codebook_size: int
    tokenizer_digest: str
    encoding_hash: str  # hash of everything that determines the tokens (tokenizer config, micro-batch)
    source_shard: str
    source_sha256: str
    schema_version: int = SCHEMA_VERSION

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "scales": list(self.scales)}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "TokenShardInfo":
        data = json.loads(raw)
        return cls(**{**data, "scales": tuple(data["scales"])})


def token_type(codebook_size: int) -> pa.DataType:
    """uint16 while every index fits, else uint32."""
    return pa.uint16() if codebook_size <= 65536 else pa.uint32()


def token_schema(info: TokenShardInfo) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("tokens", pa.list_(pa.field("item", token_type(info.codebook_size), nullable=False)),
                     nullable=False),
            pa.field("caption", pa.string()),
            pa.field("json", pa.string()),
            pa.field("image_sha256", pa.string(), nullable=False),
        ],
        metadata={METADATA_KEY: info.to_json().encode()},
    )


def build_token_table(keys: list[str], tokens: np.ndarray, captions: list[str | None],
                      jsons: list[str | None], digests: list[str], info: TokenShardInfo) -> pa.Table:
    """A token-shard table from per-sample columns; ``tokens`` is [N, num_tokens] integers."""
    n = len(keys)
    if tokens.shape != (n, info.num_tokens):
        raise TokenShardError(f"tokens have shape {tokens.shape}, expected ({n}, {info.num_tokens})")
    if n and (tokens.min() < 0 or tokens.max() >= info.codebook_size):
        raise TokenShardError(f"token indices outside [0, {info.codebook_size})")
    value_type = token_type(info.codebook_size)
    flat = pa.array(tokens.reshape(-1).astype(value_type.to_pandas_dtype()), type=value_type)
    offsets = pa.array(np.arange(0, (n + 1) * info.num_tokens, info.num_tokens, dtype=np.int32))
    schema = token_schema(info)
    token_list = pa.ListArray.from_arrays(offsets, flat, type=schema.field("tokens").type)
    return pa.Table.from_arrays(
        [pa.array(keys, pa.string()), token_list, pa.array(captions, pa.string()),
         pa.array(jsons, pa.string()), pa.array(digests, pa.string())],
        schema=schema,
    )


def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """Serialise a table to Parquet bytes (deterministic for the same table and pyarrow).

    With an entropy-coding codec (zstd, gzip) token indices are written BYTE_STREAM_SPLIT instead
    of dictionary-encoded: the dictionary page of a K=32768 codebook costs ~0.5 B/token in a
    250-image shard, while split byte streams compress to within 2% of log2(K)/8 at any shard
    size (benchmarks/RESULTS.md). Needs a reader with BYTE_STREAM_SPLIT for INT32 (Arrow >= 17).
    """
    options: dict[str, object] = {}
    if compression in _ENTROPY_CODECS and "tokens" in table.column_names:
        options = {"use_dictionary": [n for n in table.column_names if n != "tokens"],
                   "column_encoding": {_TOKENS_LEAF: "BYTE_STREAM_SPLIT"}}
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=None if compression == "none" else compression, **options)
    return sink.getvalue()


def read_shard_info(url: str) -> TokenShardInfo:
    """The :class:`TokenShardInfo` from a token shard's footer (reads only the footer)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
    if METADATA_KEY not in metadata:
        raise TokenShardError(f"{url}: not a token shard (no '{METADATA_KEY.decode()}' metadata)")
    return TokenShardInfo.from_json(metadata[METADATA_KEY])


def read_table(url: str, columns: list[str] | None = None) -> pa.Table:
    """A token shard's table (only ``columns`` when given)."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


@dataclass(frozen=True)
class TokenSample:
    key: str
    tokens: np.ndarray  # [num_tokens] int64
    caption: str | None
    json: str | None


def iter_token_samples(urls: Iterable[str]) -> Iterator[TokenSample]:
    """Every sample of the given token shards, in order, tokens as int64 arrays."""
    for url in urls:
        info = read_shard_info(url)
        table = read_table(url)
        flat = table.column("tokens").combine_chunks().flatten().to_numpy().astype(np.int64)
        tokens = flat.reshape(table.num_rows, info.num_tokens)
        cols = table.select(["key", "caption", "json"]).to_pydict()
        for i in range(table.num_rows):
            yield TokenSample(cols["key"][i], tokens[i], cols["caption"][i], cols["json"][i])
