"""Corpus shard -> token shard, with one loaded tokenizer. Pure Python/torch (no Ray).

Tokens do not depend on how images are batched: the model always runs on micro-batches of a
fixed shape (``micro_batch``, the last one zero-padded), and per-sample results on a fixed shape
do not depend on the other samples in it. ``batch_size`` only bounds how many decoded images are
held at once (two batches: one encoding, the next decoding).

Decoding overlaps encoding: while the model encodes one batch of ``batch_size`` samples,
``decode_threads`` threads decode the next (Pillow and torch release the GIL), so the encoder,
a GPU's above all, does not wait for the CPUs between batches.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig, TokenizerView, config_hash
from tokenflow.data.corpus import RawSample, iter_record
from tokenflow.data.decode import DecodeError, decode_image, preprocess, sha256_hex
from tokenflow.data.manifest import ShardRecord
from tokenflow.data.token_shards import (QUARANTINE_SCHEMA, SCHEMA_VERSION, TokenShardError, TokenShardInfo,
                                         build_token_table, parquet_bytes, read_shard_info)
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.weights import file_sha256, load_tokenizer

log = logging.getLogger(__name__)

PREPROCESS_VERSION = "short-side-bicubic-center-crop/1"


SHARDS_DIR = "shards"  # the token shards, under the stage's output


def token_shard_path(split: str, shard_name: str) -> str:
    """A corpus shard's token shard, relative to the stage's output (named after the input)."""
    stem = shard_name.rsplit(".", 1)[0]
    return f"{SHARDS_DIR}/{split}/{stem}.parquet"


def token_shard_url(out_url: str, split: str, shard_name: str) -> str:
    """Where the token shard for a corpus shard goes."""
    return storage.join(out_url, token_shard_path(split, shard_name))


def quarantine_part_url(out_url: str, split: str, shard_name: str) -> str:
    stem = shard_name.rsplit(".", 1)[0]
    return storage.join(out_url, "_quarantine", split, f"{stem}.parquet")


def encoding_hash(tokenizer_digest: str, micro_batch: int, view: TokenizerView | None = None,
                  limits: SampleLimitsConfig = DEFAULT_LIMITS) -> str:
    """Identity of an encoding: equal hashes give equal tokens for equal image bytes (and
    quarantine the same images)."""
    identity = {"tokenizer": tokenizer_digest, "micro_batch": micro_batch, "preprocess": PREPROCESS_VERSION,
                "limits": limits.image_identity()}
    if view is not None:
        identity["view"] = view.model_dump(mode="json")
    return config_hash(identity)


def made_by(info: TokenShardInfo, tokenizer_digest: str, encoding: str, source_shard: str, source_sha256: str) -> bool:
    """Whether a token shard (its ``info``) is encoding ``encoding`` of tokenizer ``tokenizer_digest``
    applied to this source shard, in this schema (scales and codebook size follow from the
    tokenizer and the view, both in ``encoding``)."""
    return ((info.schema_version, info.tokenizer_digest, info.encoding_hash, info.source_shard, info.source_sha256)
            == (SCHEMA_VERSION, tokenizer_digest, encoding, source_shard, source_sha256))


@dataclass(frozen=True)
class ShardResult:
    """Outcome of one corpus shard."""

    split: str
    name: str
    rows: int
    quarantined: int
    seconds: float
    skipped: bool


@dataclass
class _Rows:
    """A shard's rows so far: the samples tokenized and the samples quarantined, in order."""

    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    jsons: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    quarantine: list[tuple[str, str]] = field(default_factory=list)

    def add(self, sample: RawSample) -> None:
        self.keys.append(sample.key)
        self.captions.append(sample.caption)
        self.jsons.append(sample.json)
        self.digests.append(sha256_hex(sample.image))


def _batches(samples: Iterable[RawSample], size: int) -> Iterator[list[RawSample]]:
    samples = iter(samples)
    while batch := list(islice(samples, size)):
        yield batch


class ShardEncoder:
    """Holds one tokenizer; turns whole corpus shards into token shards, idempotently."""

    def __init__(self, tokenizer_url: str, out_url: str, batch_size: int, micro_batch: int,
                 device: str = "cpu", limits: SampleLimitsConfig = DEFAULT_LIMITS, compression: str = "zstd",
                 allow_tf32: bool = False, cache_dir: str = storage.CACHE_ROOT,
                 view: TokenizerView | None = None, decode_threads: int = 1):
        path = storage.local_path(tokenizer_url, cache_dir)
        self.tokenizer_digest = file_sha256(path)
        model = load_tokenizer(path, map_location=device, view=view)
        model.teacher = None  # inference only
        self.model: TokenFlowTokenizer = model.eval()
        self.out_url = out_url
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self.device = torch.device(device)
        self.limits = limits
        self.compression = compression
        self.decode_threads = decode_threads
        self.encoding_hash = encoding_hash(self.tokenizer_digest, micro_batch, view, limits)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False

    def info_for(self, record: ShardRecord) -> TokenShardInfo:
        q = self.model.cfg.quantizer
        return TokenShardInfo(scales=tuple(q.scales), codebook_size=q.codebook_size,
                              tokenizer_digest=self.tokenizer_digest, encoding_hash=self.encoding_hash,
                              source_shard=record.name, source_sha256=record.sha256)

    def is_done(self, record: ShardRecord, split: str) -> bool:
        """True when this shard's token shard exists and was made by this exact encoding."""
        url = token_shard_url(self.out_url, split, record.name)
        if not storage.exists(url):
            return False
        found = read_shard_info(url)
        if not made_by(found, self.tokenizer_digest, self.encoding_hash, record.name, record.sha256):
            raise TokenShardError(f"{url} exists but was made from other inputs ({found} != {self.info_for(record)}); "
                                  "refusing to mix encodings in one output")
        return True

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """[N, 3, H, W] in [0, 1] -> [N, num_tokens] int64, in fixed-shape micro-batches."""
        out = np.empty((images.shape[0], self.model.num_tokens), dtype=np.int64)
        for start in range(0, images.shape[0], self.micro_batch):
            chunk = images[start : start + self.micro_batch]
            n = chunk.shape[0]
            if n < self.micro_batch:
                pad = chunk.new_zeros((self.micro_batch - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            out[start : start + n] = self.model.encode(chunk.to(self.device))[:n].cpu().numpy()
        return out

    def _decode(self, sample: RawSample) -> torch.Tensor | str:
        """A sample's preprocessed image, or why it is quarantined."""
        if sample.problem is not None:
            return sample.problem
        try:
            image = decode_image(sample.image, self.limits)
        except DecodeError as exc:
            return f"{exc.reason}: {exc}"
        return preprocess(image, self.model.cfg.image_size)

    def encode_shard(self, record: ShardRecord, split: str) -> ShardResult:
        """Encode one corpus shard; writes its quarantine part, then its token shard (atomically)."""
        start = time.perf_counter()
        if self.is_done(record, split):
            return ShardResult(split, record.name, -1, -1, 0.0, skipped=True)
        rows, tokens = _Rows(), []
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            decoding: list[tuple[RawSample, Future]] = []
            for batch in _batches(iter_record(record), self.batch_size):
                next_decoding = [(s, pool.submit(self._decode, s)) for s in batch]
                tokens.append(self._encode_decoded(decoding, rows))
                decoding = next_decoding
            tokens.append(self._encode_decoded(decoding, rows))
        q_table = pa.Table.from_pylist(
            [{"key": k, "split": split, "shard": record.name, "reason": r} for k, r in rows.quarantine],
            schema=QUARANTINE_SCHEMA)
        storage.write_bytes_atomic(quarantine_part_url(self.out_url, split, record.name),
                                   parquet_bytes(q_table, self.compression))
        table = build_token_table(rows.keys, np.concatenate(tokens), rows.captions, rows.jsons, rows.digests,
                                  self.info_for(record))
        storage.write_bytes_atomic(token_shard_url(self.out_url, split, record.name),
                                   parquet_bytes(table, self.compression))
        seconds = time.perf_counter() - start
        log.info("%s/%s: %d tokenized, %d quarantined in %.1fs", split, record.name, len(rows.keys),
                 len(rows.quarantine), seconds)
        return ShardResult(split, record.name, len(rows.keys), len(rows.quarantine), seconds, skipped=False)

    def _encode_decoded(self, decoding: list[tuple[RawSample, Future]], rows: _Rows) -> np.ndarray:
        """Wait for one batch's decoding, add its samples to ``rows`` and encode its images."""
        images = []
        for sample, future in decoding:
            decoded = future.result()
            if isinstance(decoded, str):
                rows.quarantine.append((sample.key, decoded))
            else:
                rows.add(sample)
                images.append(decoded)
        if not images:
            return np.zeros((0, self.model.num_tokens), np.int64)
        return self.encode_images(torch.stack(images))
