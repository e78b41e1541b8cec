"""The training data stream: exact resume, and re-sharding onto another world size mid-epoch
without skipping or repeating a sample (checked by sample ids)."""

from __future__ import annotations

import pytest

from tokenflow.train.sharded_stream import ShardedStream

SIZES = [7, 5, 9, 4, 6, 8]  # shards of unequal size, so workers drift apart within an epoch
IDS = [[f"s{shard}-{i}" for i in range(n)] for shard, n in enumerate(SIZES)]
TOTAL = sum(SIZES)


def _streams(world: int, states: list[dict] | None = None, seed: int = 5) -> list[ShardedStream[str]]:
    streams = [ShardedStream(len(IDS), IDS.__getitem__, rank, world, seed) for rank in range(world)]
    for stream, state in zip(streams, states or []):
        stream.load_state_dict(state)
    return streams


def _take(streams: list[ShardedStream[str]], rounds: int) -> list[str]:
    """Each worker takes one item per round (as every rank takes a micro-batch per step)."""
    return [stream.next()[1] for _ in range(rounds) for stream in streams]


def _reshard(streams: list[ShardedStream[str]], world: int, seed: int = 5) -> list[ShardedStream[str]]:
    states = [s.state_dict() for s in streams]
    fresh = _streams(world, seed=seed)
    for stream in fresh:
        stream.load_state_dict(stream.resharded(states))
    return fresh


def test_resume_continues_with_exactly_the_same_items():
    straight = _streams(2)
    expected = _take(straight, 30)
    first = _streams(2)
    head = _take(first, 11)
    resumed = _streams(2, [s.state_dict() for s in first])
    assert head + _take(resumed, 19) == expected


def _drain(streams: list[ShardedStream[str]], epoch: int) -> list[str]:
    """What each worker takes until it moves past ``epoch``."""
    out = []
    for s in streams:
        while True:
            item = s.next()[1]
            if s.epoch > epoch:
                break
            out.append(item)
    return out


@pytest.mark.parametrize("worlds", [(2, 1, 2), (3, 2), (1, 4), (4, 8, 3)])
def test_resharding_mid_epoch_sees_every_sample_of_the_epoch_once(worlds):
    streams, seen = _streams(worlds[0]), []
    for world in worlds[1:]:
        seen += _take(streams, 1)
        assert all(s.epoch == 0 for s in streams)
        streams = _reshard(streams, world)
    seen += _drain(streams, 0)
    assert sorted(seen) == sorted(sum(IDS, []))
    # The next epoch starts whole on the new world size, as a fresh run of that size would.
    fresh = _streams(worlds[-1])
    for s in fresh:
        s.load_state_dict({"epoch": 1, "position": 0, "segment": 0, "offset": 0, "plan": None})
    assert [s.state_dict() for s in streams] == [{**f.state_dict(), "position": 1, "offset": 1} for f in fresh]


def test_resharding_workers_in_different_epochs_loses_and_repeats_nothing():
    """One worker has wrapped into epoch 1 while the other is still in epoch 0: after re-sharding,
    epochs 0 and 1 together are every sample exactly twice."""
    streams, seen = _streams(2), []
    while streams[0].epoch == streams[1].epoch:
        seen += _take(streams, 1)
    streams = _reshard(streams, 3)
    assert all(s.epoch == 1 for s in streams)
    seen += _drain(streams, 1)
    assert sorted(seen) == sorted(sum(IDS, []) * 2)


def test_a_worker_without_items_is_an_error():
    stream = ShardedStream(1, lambda i: ["only"], rank=1, world_size=2, seed=0)
    with pytest.raises(ValueError, match="got no items"):
        stream.next()


def test_fewer_shards_than_workers_still_serve_every_worker():
    """3 shards of 2 items on 4 workers: the epoch's items are dealt across the shards in order,
    so every worker gets some and none twice."""
    shards = [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]]
    streams = [ShardedStream(3, shards.__getitem__, rank, 4, seed=1) for rank in range(4)]
    assert sorted(_drain(streams, 0)) == sorted(sum(shards, []))
    assert all(s.epoch == 1 for s in streams)
