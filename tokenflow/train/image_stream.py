"""A deterministic, resumable stream of augmented training images for one worker.

The corpora's mixture, shard order, rank sharding and resumption come from :class:`MixtureStream`;
augmentation randomness comes from ``(source seed, epoch, rank, position)``, so restoring the
stream's state replays exactly the same batches without decoding the skipped images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig
from tokenflow.data.corpus import RawSample, iter_record
from tokenflow.data.decode import DecodeError, decode_image, random_resized_crop
from tokenflow.data.manifest import ShardRecord
from tokenflow.train.mixture import MixtureSource, MixtureStream, mixture_stream

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


@dataclass
class _Watch:
    """One source's epoch being read from its first item, and the usable images in it so far."""

    epoch: int = -1
    usable: int = 0
    whole_epoch: bool = False  # the epoch is read on its usual plan from its first item
    corpus_usable: bool = False  # some shard of the source (any worker's) holds a usable image


class ImageStream:
    """Endless per-worker iterator of [3, S, S] training images in [0, 1] from a mixture of
    corpora (:class:`MixtureStream`)."""

    def __init__(self, sources: list[MixtureSource[ShardRecord]], rank: int, world_size: int, seed: int,
                 image_size: int, min_scale: float = 0.8, limits: SampleLimitsConfig = DEFAULT_LIMITS):
        self.sources, self.rank = sources, rank
        self.seed, self.image_size, self.min_scale, self.limits = seed, image_size, min_scale, limits
        self.quarantined: list[QuarantinedSample] = []
        self._watch = [_Watch() for _ in sources]
        self.stream: MixtureStream[RawSample] = mixture_stream(sources, iter_record, lambda s: [s], rank, world_size,
                                                               seed)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def _augment(self, shard: str, sample: RawSample, seed: list[int]) -> torch.Tensor | None:
        """Decode and augment one sample; None (and a quarantine record) when it is unusable."""
        rng = np.random.default_rng(seed)
        try:
            if sample.problem is not None:
                raise DecodeError(sample.problem, sample.problem)
            return random_resized_crop(decode_image(sample.image, self.limits), self.image_size,
                                       rng, self.min_scale)
        except DecodeError as exc:
            self.quarantined.append(QuarantinedSample(sample.key, shard, exc.reason))
            log.warning("quarantined %s (%s): %s", sample.key, shard, exc.reason)
            return None

    def _has_usable_image(self, source: int) -> bool:
        """Whether any training shard of ``source`` (not only this worker's share) holds an image
        that decodes; read once, when a whole epoch of this worker's share held none."""
        watch = self._watch[source]
        if not watch.corpus_usable:
            watch.corpus_usable = any(
                sample.problem is None and _decodes(sample.image, self.limits)
                for record in self.sources[source].shards for sample in iter_record(record))
            if watch.corpus_usable:
                log.warning("worker %d: a whole epoch of its share of corpus %s held no usable image; "
                            "other shards do, training goes on", self.rank, self.sources[source].corpus)
        return watch.corpus_usable

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` decodable images, [B, 3, S, S]. Raises ``ValueError`` when no
        training shard of a corpus holds a usable image (instead of looping forever)."""
        images = []
        while len(images) < batch_size:
            source, shard, sample = self.stream.next()
            drawn, watch = self.stream.sources[source], self._watch[source]
            if drawn.epoch != watch.epoch:  # this item opened an epoch of its source (or is the first one read)
                if watch.whole_epoch and not watch.usable and not self._has_usable_image(source):
                    raise ValueError(f"no training shard of corpus {self.sources[source].corpus!r} holds a usable "
                                     f"image ({len(self.sources[source].shards)} shards; {len(self.quarantined)} "
                                     f"quarantined here, e.g. {[(q.key, q.reason) for q in self.quarantined[:3]]})")
                # Counted only for an epoch read from its first item on its usual plan (not a resumed
                # or re-sharded remainder, which may hold only a few samples).
                watch.epoch, watch.usable = drawn.epoch, 0
                watch.whole_epoch = drawn.position == 1 and drawn.plan is None
            seed = [self.seed + 7919 * source, drawn.epoch, self.rank, drawn.position - 1]
            image = self._augment(self.sources[source].shards[shard].name, sample, seed)
            if image is None:
                self.stream.reject(source)  # the corpus's share counts usable images
            else:
                images.append(image)
                watch.usable += 1
        return torch.stack(images)
