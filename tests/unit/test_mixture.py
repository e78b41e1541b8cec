"""The weighted mixture of training corpora: proportions on every worker and world size, exact
resume, re-sharding mid-epoch without skipping or repeating an item, deduplicated rows left out."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tokenflow.train.mixture import MixtureSource, MixtureStream, mixture_stream
from tokenflow.train.sharded_stream import ShardedStream


def _corpus(tag: str, sizes: list[int]) -> list[list[tuple[str, int, int]]]:
    return [[(tag, shard, i) for i in range(n)] for shard, n in enumerate(sizes)]


A = _corpus("a", [7, 5, 9, 4, 6, 8])  # 39 items
B = _corpus("b", [3, 6, 2, 5])  # 16 items: upsampled at weight 0.3
C = _corpus("c", [10, 4, 7])  # 21 items
NAMES = ["a", "b", "c"]


def _mixtures(world: int, corpora=(A, B), weights=(0.7, 0.3), states=None) -> list[MixtureStream]:
    mixtures = [MixtureStream([ShardedStream(len(c), c.__getitem__, rank, world, seed=3 + i) for i, c in enumerate(corpora)],
                              list(weights), NAMES[:len(corpora)]) for rank in range(world)]
    for mixture, state in zip(mixtures, states or []):
        mixture.load_state_dict(state)
    return mixtures


def _take(mixtures: list[MixtureStream], rounds: int) -> list[tuple[int, int, tuple]]:
    """Each worker draws once per round."""
    return [m.next() for _ in range(rounds) for m in mixtures]


def _first_epoch(mixtures: list[MixtureStream]) -> list[tuple]:
    """The items each worker draws until every one of its sources has moved past epoch 0."""
    out = []
    for m in mixtures:
        while any(s.epoch == 0 for s in m.sources):
            source, _, item = m.next()
            if m.sources[source].epoch == 0:
                out.append(item)
    return out


def _exact(weights) -> list[Fraction]:
    total = sum(Fraction(w) for w in weights)
    return [Fraction(w) / total for w in weights]


@pytest.mark.parametrize("corpora, weights", [((A, B), (0.7, 0.3)), ((A, B, C), (5, 3, 2)), ((A, B, C), (1, 1, 1))])
def test_each_worker_tracks_the_weights_within_one_item(corpora, weights):
    mixture = _mixtures(1, corpora, weights)[0]
    shares = _exact(weights)
    for n in range(1, 1001):
        mixture.next()
        assert all(abs(c - w * n) < 1 for c, w in zip(mixture.counts.values(), shares))
    assert mixture.draws == sum(mixture.counts.values()) == 1000
    assert mixture.realised() == pytest.approx(dict(zip(NAMES, mixture.weights)), abs=0.01)
    assert mixture.weights == pytest.approx([float(w) for w in shares])
    assert mixture.sources[1].epoch >= 10  # the 16 items of B are repeated


def test_ties_go_to_the_lowest_index_and_the_rule_interleaves():
    mixture = _mixtures(1, (A, B, C), (1, 1, 2))[0]
    assert [mixture.next()[0] for _ in range(8)] == [2, 0, 1, 2, 2, 0, 1, 2]
    assert mixture.realised() == {"a": 0.25, "b": 0.25, "c": 0.5}


def test_two_constructions_draw_the_same_sequence():
    first, second = _mixtures(2, (A, B, C), (5, 3, 2)), _mixtures(2, (A, B, C), (5, 3, 2))
    assert _take(first, 200) == _take(second, 200)
    assert [m.counts for m in first] == [m.counts for m in second]


@pytest.mark.parametrize("world", [2, 3])
def test_workers_split_each_source_epoch_without_overlap(world):
    """With at least as many shards as workers, the workers' draws of a source in its first epoch
    are its items, each once."""
    seen = _first_epoch(_mixtures(world, (A, B, C), (5, 3, 2)))
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(sum(A + B + C, []))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_proportions_on_every_world_size(world):
    mixtures = _mixtures(world, (A, B, C), (5, 3, 2))
    _take(mixtures, 999 // world)
    total = sum(m.draws for m in mixtures)
    for name, share in zip(NAMES, _exact((5, 3, 2))):
        count = sum(m.counts[name] for m in mixtures)
        assert abs(count - share * total) < world
        assert count / total == pytest.approx(float(share), abs=0.01)


def test_resume_continues_with_exactly_the_same_draws():
    straight = _mixtures(2, (A, B, C), (5, 3, 2))
    expected = _take(straight, 97)
    first = _mixtures(2, (A, B, C), (5, 3, 2))
    head = _take(first, 37)
    resumed = _mixtures(2, (A, B, C), (5, 3, 2), [m.state_dict() for m in first])
    assert head + _take(resumed, 60) == expected
    assert [m.state_dict() for m in resumed] == [m.state_dict() for m in straight]
    assert [m.counts for m in resumed] == [m.counts for m in straight]


@pytest.mark.parametrize("worlds", [(2, 3), (3, 2), (1, 2), (2, 3, 1)])
def test_resharding_mid_epoch_sees_every_item_of_the_epoch_once(worlds):
    mixtures, seen = _mixtures(worlds[0]), []
    for world in worlds[1:]:
        seen += [item for _, _, item in _take(mixtures, 4)]
        assert all(s.epoch == 0 for m in mixtures for s in m.sources)  # both sources partly consumed
        states = [m.state_dict() for m in mixtures]
        mixtures = _mixtures(world)
        for m in mixtures:
            m.load_state_dict(m.resharded(states))
        # The counters are dealt out: the totals carry over, the draws split evenly.
        assert [sum(m.counts[n] for m in mixtures) for n in ("a", "b")] == [sum(s["counts"][i] for s in states) for i in range(2)]
        total = sum(s["draws"] for s in states)
        assert [m.draws for m in mixtures] == [total // world + (rank < total % world) for rank in range(world)]
    seen += _first_epoch(mixtures)
    assert sorted(seen) == sorted(sum(A + B, []))


def test_after_resharding_the_global_proportions_hold():
    mixtures = _mixtures(2, (A, B, C), (5, 3, 2))
    _take(mixtures, 51)
    states = [m.state_dict() for m in mixtures]
    mixtures = _mixtures(3, (A, B, C), (5, 3, 2))
    for m in mixtures:
        m.load_state_dict(m.resharded(states))
    _take(mixtures, 300)
    total = sum(m.draws for m in mixtures)
    assert total == 102 + 900
    for name, share in zip(NAMES, _exact((5, 3, 2))):
        assert abs(sum(m.counts[name] for m in mixtures) - share * total) < 3


class _Row:
    def __init__(self, key: str):
        self.key = key


def test_mixture_stream_leaves_the_dropped_rows_out_and_keeps_the_proportions():
    shards = {"s0": [_Row(f"k{i}") for i in range(6)], "s1": [_Row(f"k{i}") for i in range(6, 10)]}
    other = {"t0": [_Row(f"x{i}") for i in range(5)]}
    sources = [MixtureSource("a", 0.7, ["s0", "s1"], {"s1": frozenset({"k6", "k7"})}), MixtureSource("b", 0.3, ["t0"])]
    stream = mixture_stream(sources, lambda shard: {**shards, **other}[shard], lambda row: [row.key], 0, 1, seed=0)
    draws = [stream.next() for _ in range(200)]
    keys_a = {key for source, _, key in draws if source == 0}
    assert keys_a == {f"k{i}" for i in (0, 1, 2, 3, 4, 5, 8, 9)}  # every kept row, no dropped one
    assert stream.counts == {"a": 140, "b": 60}


def test_a_rejected_draw_is_not_counted_and_the_same_source_draws_again():
    mixture = _mixtures(1)[0]
    draws = [mixture.next() for _ in range(9)]
    assert [d[0] for d in draws].count(0) == 6
    rejected = 0
    for _ in range(100):
        source, _, item = mixture.next()
        if source == 0 and item[2] % 4 == 0:  # a quarter of a's items are unusable
            mixture.reject(0)
            rejected += 1
    assert rejected and abs(mixture.counts["a"] - 0.7 * mixture.draws) <= 1 and mixture.draws == 109 - rejected


def test_a_source_without_items_is_named():
    empty = ShardedStream(2, lambda shard: [], 0, 1, seed=0)
    mixture = MixtureStream([ShardedStream(len(A), A.__getitem__, 0, 1, seed=3), empty], [1, 1], ["a", "empty"])
    mixture.next()
    with pytest.raises(ValueError, match="mixture source 'empty'.*no items"):
        mixture.next()


def _stream(rank: int = 0, world: int = 1) -> ShardedStream:
    return ShardedStream(len(A), A.__getitem__, rank, world, seed=3)


@pytest.mark.parametrize("sources, weights, names, message", [
    ([], [], [], "no sources"),
    ([_stream(), _stream()], [1.0], ["a", "b"], "2 sources, 1 weights and 2 names"),
    ([_stream(), _stream()], [1.0, 1.0], ["a"], "2 sources, 2 weights and 1 names"),
    ([_stream(), _stream()], [1.0, 0.0], ["a", "b"], "source 'b' has weight 0.0"),
    ([_stream(), _stream()], [-1.0, 1.0], ["a", "b"], "source 'a' has weight -1.0"),
    ([_stream(), _stream()], [float("nan"), 1.0], ["a", "b"], "source 'a' has weight nan"),
    ([_stream(), _stream()], [1.0, 1.0], ["a", "a"], "source names repeat"),
    ([_stream(0, 2), _stream(1, 2)], [1.0, 1.0], ["a", "b"], "differ in rank or world size"),
])
def test_bad_input_is_refused(sources, weights, names, message):
    with pytest.raises(ValueError, match=message):
        MixtureStream(sources, weights, names)


def test_a_state_of_another_mixture_is_refused():
    state = _mixtures(1, (A, B, C), (5, 3, 2))[0].state_dict()
    with pytest.raises(ValueError, match="state of 3 sources for a mixture of 2"):
        _mixtures(1)[0].load_state_dict(state)
