"""Deterministic, resumable, rank-sharded iteration over the items of a list of shards.

Epoch ``e`` orders the shards by a permutation drawn from ``(seed, e)``. With at least as many
shards as workers, worker ``r`` reads shards ``r, r + W, ...`` of that order (no overlap); with
fewer, every worker reads every shard and keeps items ``r, r + W, ...``. Items inside a shard are
shuffled from ``(seed, e, shard)``. The state is ``(epoch, position)``; restoring it continues
with exactly the same items, skipping the consumed ones without any per-item work.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


class ShardedStream(Generic[T]):
    """Endless per-worker iterator of ``(shard index, item)``; ``read(i)`` lists shard i's items."""

    def __init__(self, num_shards: int, read: Callable[[int], list[T]], rank: int, world_size: int, seed: int):
        if num_shards == 0:
            raise ValueError("the training split has no shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.num_shards, self.read = num_shards, read
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position = 0, 0
        self._items: Iterator[tuple[int, T]] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._items = None

    def _epoch_items(self, epoch: int) -> Iterator[tuple[int, T]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_shards)
        by_shard = self.num_shards >= self.world_size
        mine = order[self.rank :: self.world_size] if by_shard else order
        kept = 0
        for shard in mine:
            items = self.read(int(shard))
            for i in np.random.default_rng([self.seed, epoch, int(shard)]).permutation(len(items)):
                if not by_shard and kept % self.world_size != self.rank:
                    kept += 1
                    continue
                kept += 1
                yield int(shard), items[int(i)]

    def _positioned(self) -> Iterator[tuple[int, T]]:
        while True:
            empty = True
            for n, item in enumerate(self._epoch_items(self.epoch)):
                empty = False
                if n >= self.position:
                    yield item
            if empty:
                raise ValueError(f"worker {self.rank} got no items (fewer items than workers?)")
            self.epoch, self.position = self.epoch + 1, 0

    def next(self) -> tuple[int, T]:
        """The next item; advances the position (also for items the caller then rejects)."""
        if self._items is None:
            self._items = self._positioned()
        item = next(self._items)
        self.position += 1
        return item
