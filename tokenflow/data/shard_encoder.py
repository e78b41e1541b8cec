"""Corpus shard -> token shard, with one loaded tokenizer. Pure Python/torch (no Ray).

Tokens do not depend on how images are batched: the model always runs on micro-batches of a
fixed shape (``micro_batch``, the last one zero-padded), and per-sample results on a fixed shape
do not depend on the other samples in it. ``batch_size`` only bounds how many decoded images are
held at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig, TokenizerView, config_hash
from tokenflow.data.corpus import iter_shard
from tokenflow.data.decode import DecodeError, decode_image, preprocess, sha256_hex
from tokenflow.data.manifest import ShardRecord
from tokenflow.data.token_shards import (QUARANTINE_SCHEMA, TokenShardError, TokenShardInfo,
                                         build_token_table, parquet_bytes, read_shard_info)
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.weights import file_sha256, load_tokenizer

log = logging.getLogger(__name__)

PREPROCESS_VERSION = "short-side-bicubic-center-crop/1"


def token_shard_url(out_url: str, split: str, shard_name: str) -> str:
    """Where the token shard for a corpus shard goes (name derived from the input's)."""
    stem = shard_name.rsplit(".", 1)[0]
    return storage.join(out_url, "shards", split, f"{stem}.parquet")


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


@dataclass(frozen=True)
class ShardResult:
    """Outcome of one corpus shard."""

    split: str
    name: str
    rows: int
    quarantined: int
    seconds: float
    skipped: bool


class ShardEncoder:
    """Holds one tokenizer; turns whole corpus shards into token shards, idempotently."""

    def __init__(self, tokenizer_url: str, out_url: str, batch_size: int, micro_batch: int,
                 device: str = "cpu", limits: SampleLimitsConfig = DEFAULT_LIMITS, compression: str = "zstd",
                 allow_tf32: bool = False, cache_dir: str = storage.CACHE_ROOT,
                 view: TokenizerView | None = None):
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
        found, wanted = read_shard_info(url), self.info_for(record)
        if found != wanted:
            raise TokenShardError(f"{url} exists but was made from other inputs ({found} != {wanted}); "
                                  "refusing to mix encodings in one output")
        return True

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """[N, 3, H, W] in [0, 1] -> [N, num_tokens] int64, in fixed-shape micro-batches."""
        out = []
        for start in range(0, images.shape[0], self.micro_batch):
            chunk = images[start : start + self.micro_batch]
            n = chunk.shape[0]
            if n < self.micro_batch:
                pad = chunk.new_zeros((self.micro_batch - n, *chunk.shape[1:]))
                chunk = torch.cat([chunk, pad])
            out.append(self.model.encode(chunk.to(self.device))[:n].cpu())
        if not out:
            return np.zeros((0, self.model.num_tokens), dtype=np.int64)
        return torch.cat(out).numpy()

    def encode_shard(self, record: ShardRecord, split: str) -> ShardResult:
        """Encode one corpus shard; writes its quarantine part, then its token shard (atomically)."""
        start = time.perf_counter()
        if self.is_done(record, split):
            return ShardResult(split, record.name, -1, -1, 0.0, skipped=True)
        size = self.model.cfg.image_size
        keys, captions, jsons, digests, tokens = [], [], [], [], []
        quarantine: list[tuple[str, str]] = []
        pending: list[torch.Tensor] = []

        def flush() -> None:
            if pending:
                tokens.append(self.encode_images(torch.stack(pending)))
                pending.clear()

        for sample in iter_shard(record.url, record.sha256):
            if sample.problem is not None:
                quarantine.append((sample.key, sample.problem))
                continue
            try:
                image = decode_image(sample.image, self.limits)
            except DecodeError as exc:
                quarantine.append((sample.key, f"{exc.reason}: {exc}"))
                continue
            keys.append(sample.key)
            captions.append(sample.caption)
            jsons.append(sample.json)
            digests.append(sha256_hex(sample.image))
            pending.append(preprocess(image, size))
            if len(pending) >= self.batch_size:
                flush()
        flush()
        all_tokens = np.concatenate(tokens) if tokens else np.zeros((0, self.model.num_tokens), np.int64)
        q_table = pa.Table.from_pylist(
            [{"key": k, "split": split, "shard": record.name, "reason": r} for k, r in quarantine],
            schema=QUARANTINE_SCHEMA)
        storage.write_bytes_atomic(quarantine_part_url(self.out_url, split, record.name),
                                   parquet_bytes(q_table, self.compression))
        table = build_token_table(keys, all_tokens, captions, jsons, digests, self.info_for(record))
        storage.write_bytes_atomic(token_shard_url(self.out_url, split, record.name),
                                   parquet_bytes(table, self.compression))
        seconds = time.perf_counter() - start
        log.info("%s/%s: %d tokenized, %d quarantined in %.1fs", split, record.name, len(keys),
                 len(quarantine), seconds)
        return ShardResult(split, record.name, len(keys), len(quarantine), seconds, skipped=False)
