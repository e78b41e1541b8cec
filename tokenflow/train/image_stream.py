"""A deterministic, resumable stream of augmented training images for one worker.

Shard order, rank sharding and resumption come from :class:`ShardedStream`; augmentation
randomness comes from ``(seed, epoch, rank, position)``, so restoring the stream's state replays
exactly the same batches without decoding the skipped images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig
from tokenflow.data.corpus import RawSample, iter_shard
from tokenflow.data.decode import DecodeError, decode_image, random_resized_crop
from tokenflow.data.manifest import ShardRecord
from tokenflow.train.sharded_stream import ShardedStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantinedSample:
    key: str
    shard: str
    reason: str


def _decodes(data: bytes | None, limits: SampleLimitsConfig) -> bool:
    try:
        decode_image(data or b"", limits)
    except DecodeError:
        return False
    return True


class ImageStream:
    """Endless per-worker iterator of [3, S, S] training images in [0, 1]."""

    def __init__(self, shards: list[ShardRecord], rank: int, world_size: int, seed: int,
                 image_size: int, min_scale: float = 0.8, limits: SampleLimitsConfig = DEFAULT_LIMITS):
        self.shards, self.rank = shards, rank
        self.seed, self.image_size, self.min_scale, self.limits = seed, image_size, min_scale, limits
        self.quarantined: list[QuarantinedSample] = []
        self._epoch, self._usable, self._whole_epoch = -1, 0, False  # usable images in the epoch read whole
        self._corpus_usable = False
        self.stream: ShardedStream[RawSample] = ShardedStream(
            len(shards), lambda i: list(iter_shard(shards[i].url, shards[i].sha256)), rank, world_size, seed)

    def state_dict(self) -> dict[str, int]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)

    def _augment(self, shard: str, sample: RawSample, epoch: int, position: int) -> torch.Tensor | None:
        """Decode and augment one sample; None (and a quarantine record) when it is unusable."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, position])
        try:
            if sample.problem is not None:
                raise DecodeError(sample.problem, sample.problem)
            return random_resized_crop(decode_image(sample.image, self.limits), self.image_size,
                                       rng, self.min_scale)
        except DecodeError as exc:
            self.quarantined.append(QuarantinedSample(sample.key, shard, exc.reason))
            log.warning("quarantined %s (%s): %s", sample.key, shard, exc.reason)
            return None

    def _corpus_has_usable_image(self) -> bool:
        """Whether any training shard (not only this worker's share) holds an image that
        decodes; read once, when a whole epoch of this worker's share held none."""
        if not self._corpus_usable:
            self._corpus_usable = any(
                sample.problem is None and _decodes(sample.image, self.limits)
                for record in self.shards for sample in iter_shard(record.url, record.sha256))
            if self._corpus_usable:
                log.warning("worker %d: a whole epoch of its share of the shards held no usable image; "
                            "other shards do, training goes on", self.rank)
        return self._corpus_usable

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` decodable images, [B, 3, S, S]. Raises ``ValueError`` when no
        training shard holds a usable image (instead of looping forever)."""
        images = []
        while len(images) < batch_size:
            epoch, position = self.stream.epoch, self.stream.position
            shard, sample = self.stream.next()
            if self.stream.epoch != self._epoch:  # this item opened an epoch (or is the first one read)
                if self._whole_epoch and not self._usable and not self._corpus_has_usable_image():
                    raise ValueError(f"no training shard holds a usable image ({len(self.shards)} shards; "
                                     f"{len(self.quarantined)} quarantined here, e.g. "
                                     f"{[(q.key, q.reason) for q in self.quarantined[:3]]})")
                # Counted only for an epoch read from its first item on its usual plan (not a resumed
                # or re-sharded remainder, which may hold only a few samples).
                self._epoch, self._usable = self.stream.epoch, 0
                self._whole_epoch = self.stream.position == 1 and self.stream.plan is None
            image = self._augment(self.shards[shard].name, sample, epoch, position)
            if image is not None:
                images.append(image)
                self._usable += 1
        return torch.stack(images)
