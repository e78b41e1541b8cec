"""A deterministic, resumable stream of augmented training images for one worker.

Epoch ``e`` orders the corpus shards by a permutation drawn from ``(seed, e)``. With at least
as many shards as workers, worker ``r`` reads shards ``r, r + W, ...`` of that order (no
overlap); with fewer, every worker reads every shard and keeps samples ``r, r + W, ...``.
Samples inside a shard are shuffled from ``(seed, e, shard)``; augmentation randomness comes from
``(seed, e, r, position)``. The stream's state is ``(epoch, position)``: restoring it replays
exactly the same batches, without decoding the skipped images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from tokenflow.data.corpus import RawSample, iter_shard
from tokenflow.data.decode import DecodeError, decode_image, random_resized_crop
from tokenflow.data.manifest import ShardRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantinedSample:
    key: str
    shard: str
    reason: str


class ImageStream:
    """Endless per-worker iterator of [3, S, S] training images in [0, 1]."""

    def __init__(self, shards: list[ShardRecord], rank: int, world_size: int, seed: int,
                 image_size: int, min_scale: float = 0.8, max_pixels: int = 64_000_000):
        if not shards:
            raise ValueError("the training split has no shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.seed, self.image_size, self.min_scale, self.max_pixels = seed, image_size, min_scale, max_pixels
        self.epoch, self.position = 0, 0
        self.quarantined: list[QuarantinedSample] = []
        self._samples: Iterator[tuple[str, RawSample]] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._samples = None

    def _epoch_samples(self, epoch: int) -> Iterator[tuple[str, RawSample]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        by_shard = len(self.shards) >= self.world_size
        mine = order[self.rank :: self.world_size] if by_shard else order
        kept = 0
        for shard_index in mine:
            record = self.shards[int(shard_index)]
            samples = list(iter_shard(record.url))
            for i in np.random.default_rng([self.seed, epoch, int(shard_index)]).permutation(len(samples)):
                if not by_shard and kept % self.world_size != self.rank:
                    kept += 1
                    continue
                kept += 1
                yield record.name, samples[int(i)]

    def _positioned(self) -> Iterator[tuple[str, RawSample]]:
        """Samples from the current (epoch, position) on, across epochs."""
        while True:
            skip = self.position
            empty = True
            for n, item in enumerate(self._epoch_samples(self.epoch)):
                empty = False
                if n < skip:
                    continue
                yield item
            if empty:
                raise ValueError(f"worker {self.rank} got no samples (fewer samples than workers?)")
            self.epoch, self.position = self.epoch + 1, 0

    def _augment(self, shard: str, sample: RawSample) -> torch.Tensor | None:
        """Decode and augment one sample; None (and a quarantine record) when it is unusable."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, self.position])
        try:
            if sample.problem is not None:
                raise DecodeError(sample.problem, sample.problem)
            return random_resized_crop(decode_image(sample.image, self.max_pixels), self.image_size,
                                       rng, self.min_scale)
        except DecodeError as exc:
            self.quarantined.append(QuarantinedSample(sample.key, shard, exc.reason))
            log.warning("quarantined %s (%s): %s", sample.key, shard, exc.reason)
            return None

    def next_batch(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` decodable images, [B, 3, S, S]."""
        if self._samples is None:
            self._samples = self._positioned()
        images = []
        while len(images) < batch_size:
            shard, sample = next(self._samples)
            image = self._augment(shard, sample)
            self.position += 1
            if image is not None:
                images.append(image)
        return torch.stack(images)
