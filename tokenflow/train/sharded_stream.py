"""Deterministic, resumable, rank-sharded iteration over the items of a list of shards, which
can be re-sharded onto another number of workers mid-epoch.

Epoch ``e`` orders the shards by a permutation drawn from ``(seed, e)``. With at least as many
shards as workers, worker ``r`` reads shards ``r, r + W, ...`` of that order (no overlap); with
fewer, every worker reads every shard and keeps the epoch's items ``r, r + W, ...`` (counted
across the shards in order). Items inside a shard
are shuffled from ``(seed, e, shard)``. A worker's epoch is a list of segments ``(epoch, shard,
begin, step)``, each the items ``begin, begin + step, ...`` of that shuffled shard; its state is
the epoch, the segment and offset it is at, and its position (items consumed this epoch).
Restoring the state continues with exactly the same items without reading the consumed shards.

:meth:`ShardedStream.resharded` turns the states of ``W`` workers into those of ``W'`` workers: what the old
workers had not yet consumed of their epoch is split item by item over the new ones, so within
the epoch no item is skipped or read twice; the epoch after starts on the usual plan for ``W'``.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

import numpy as np

T = TypeVar("T")

Segment = tuple[int, int, int, int]  # (epoch, shard, first item, step) over the shard's shuffled items


def epoch_plan(num_shards: int, seed: int, epoch: int, rank: int, world_size: int,
               length: Callable[[int], int]) -> list[Segment]:
    """Worker ``rank``'s segments of ``epoch`` when the epoch starts with ``world_size`` workers
    (``length(i)``: shard i's item count, read only with fewer shards than workers)."""
    order = [int(s) for s in np.random.default_rng([seed, epoch]).permutation(num_shards)]
    if num_shards >= world_size:
        return [(epoch, s, 0, 1) for s in order[rank::world_size]]
    plan, before = [], 0  # item j of the epoch (all shards in order) goes to worker j mod W
    for shard in order:
        plan.append((epoch, shard, (rank - before) % world_size, world_size))
        before += length(shard)
    return plan


class ShardedStream(Generic[T]):
    """Endless per-worker iterator of ``(shard index, item)``; ``read(i)`` lists shard i's items."""

    def __init__(self, num_shards: int, read: Callable[[int], list[T]], rank: int, world_size: int, seed: int):
        if num_shards == 0:
            raise ValueError("the training split has no shards")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.num_shards, self.read = num_shards, read
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.position, self.segment, self.offset = 0, 0, 0, 0
        self.plan: list[Segment] | None = None  # None: the epoch's usual plan
        self._items: list[T] | None = None  # the current segment's items
        self._lengths: dict[int, int] = {}
        self._empty_epochs = 0

    def length(self, shard: int) -> int:
        """How many items shard ``shard`` holds (read once)."""
        if shard not in self._lengths:
            self._lengths[shard] = len(self.read(shard))
        return self._lengths[shard]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "segment": self.segment, "offset": self.offset,
                "plan": None if self.plan is None else [list(s) for s in self.plan]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.segment, self.offset = int(state["segment"]), int(state["offset"])
        self.plan = None if state["plan"] is None else [tuple(s) for s in state["plan"]]
        self._items = None

    def _segments(self) -> list[Segment]:
        if self.plan is not None:
            return self.plan
        return epoch_plan(self.num_shards, self.seed, self.epoch, self.rank, self.world_size, self.length)

    def _segment_items(self, segment: Segment) -> list[T]:
        epoch, shard, begin, step = segment
        items = self.read(shard)
        order = np.random.default_rng([self.seed, epoch, shard]).permutation(len(items))
        return [items[int(i)] for i in order[begin::step]]

    def next(self) -> tuple[int, T]:
        """The next item; advances the position (also for items the caller then rejects)."""
        while True:
            segments = self._segments()
            if self.segment >= len(segments):
                self._empty_epochs = 0 if self.position else self._empty_epochs + 1
                if self._empty_epochs > 1:
                    raise ValueError(f"worker {self.rank} got no items (fewer items than workers?)")
                self.epoch, self.position, self.segment, self.offset, self.plan = self.epoch + 1, 0, 0, 0, None
                self._items = None
                continue
            if self._items is None:
                self._items = self._segment_items(segments[self.segment])
            if self.offset < len(self._items):
                item = self._items[self.offset]
                self.offset += 1
                self.position += 1
                return segments[self.segment][1], item
            self.segment, self.offset, self._items = self.segment + 1, 0, None


    def resharded(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """This worker's state that continues the epoch the workers of another world size with
        ``states`` (one per old rank, in rank order) were in: the items none of them consumed yet,
        split item by item over the new workers. Old workers in different epochs (one wrapped
        before the others) are brought to the latest one: the laggards' rest of their epoch and
        their whole share of each epoch up to the latest one are in the remainder."""
        old_world, latest = len(states), max(int(s["epoch"]) for s in states)
        remainder: list[Segment] = []
        for old_rank, state in enumerate(states):
            epoch = int(state["epoch"])
            plan = ([tuple(s) for s in state["plan"]] if state["plan"] is not None
                    else epoch_plan(self.num_shards, self.seed, epoch, old_rank, old_world, self.length))
            segment, offset = int(state["segment"]), int(state["offset"])
            if segment < len(plan):
                e, shard, begin, step = plan[segment]
                remainder.append((e, shard, begin + offset * step, step))
                remainder += plan[segment + 1:]
            for later in range(epoch + 1, latest + 1):
                remainder += epoch_plan(self.num_shards, self.seed, later, old_rank, old_world, self.length)
        mine = [(e, shard, begin + self.rank * step, step * self.world_size) for e, shard, begin, step in remainder]
        return {"epoch": latest, "position": 0, "segment": 0, "offset": 0, "plan": [list(s) for s in mine]}
