"""Deterministic weighted mixture of several :class:`ShardedStream` sources (one per corpus).

Draw ``n`` (counted from 0) of a worker comes from the source whose deficit ``w * (n + 1) - c``
is largest (``w`` its normalised weight, ``c`` its draws so far; ties to the lowest index): a
smooth weighted round-robin. On every worker each source's count stays within one item of
``w * n``, the same in every run, so over ``W`` workers the global counts stay within ``W`` items
of the target. The deficits are exact (integers over the weights' common denominator), so ties
do not depend on rounding. Each source runs through its own epochs: a small corpus with a large
weight repeats.

:func:`mixture_stream` builds one from :class:`MixtureSource` descriptions (what a stage driver
hands its workers), leaving out the rows deduplication dropped (:mod:`tokenflow.data.dedup`).

:meth:`MixtureStream.resharded` re-shards each source and deals the old workers' counters out
to the new ones, so the global counts, and with them the deficit rule, carry over.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

from tokenflow.train.sharded_stream import ShardedStream

T = TypeVar("T")
R = TypeVar("R")  # a shard row with a ``key``


def _deal(totals: list[int], rank: int, world_size: int) -> list[int]:
    """Worker ``rank``'s part of each total when the units of all totals, one total after the
    other, are dealt out one by one to ``world_size`` workers."""
    mine, before = [], 0
    for total in totals:
        mine.append(len(range(rank, before + total, world_size)) - len(range(rank, before, world_size)))
        before += total
    return mine


class MixtureStream(Generic[T]):
    """Endless per-worker iterator of ``(source index, shard index, item)`` over ``sources`` (built
    with one rank and world size) mixed by ``weights``; ``names`` label the counters."""

    def __init__(self, sources: list[ShardedStream[T]], weights: list[float], names: list[str]):
        if not sources:
            raise ValueError("the mixture has no sources")
        if not len(sources) == len(weights) == len(names):
            raise ValueError(f"{len(sources)} sources, {len(weights)} weights and {len(names)} names: "
                             "need one weight and one name per source")
        if len(set(names)) < len(names):
            raise ValueError(f"source names repeat: {names}")
        for name, weight in zip(names, weights):
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"source {name!r} has weight {weight}; weights must be positive")
        if len({(s.rank, s.world_size) for s in sources}) > 1:
            raise ValueError("the sources differ in rank or world size")
        total = sum(Fraction(w) for w in weights)
        shares = [Fraction(w) / total for w in weights]
        self._scale = math.lcm(*(s.denominator for s in shares))
        self._parts = [int(s * self._scale) for s in shares]  # weight i = parts[i] / scale exactly
        self.sources, self.names = sources, names
        self.weights = [float(s) for s in shares]
        self.rank, self.world_size = sources[0].rank, sources[0].world_size
        self.draws = 0
        self._counts = [0] * len(sources)

    @property
    def counts(self) -> dict[str, int]:
        """Draws per source name."""
        return dict(zip(self.names, self._counts))

    def realised(self) -> dict[str, float]:
        """Each source's fraction of the draws so far (0 before the first draw)."""
        return {name: count / self.draws if self.draws else 0.0 for name, count in zip(self.names, self._counts)}

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "counts": list(self._counts), "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"state of {len(state['sources'])} sources for a mixture of {len(self.sources)}")
        self.draws = int(state["draws"])
        self._counts = [int(c) for c in state["counts"]]
        for source, source_state in zip(self.sources, state["sources"]):
            source.load_state_dict(source_state)

    def next(self) -> tuple[int, int, T]:
        """The next draw; a source without items raises ValueError naming it."""
        deficits = [part * (self.draws + 1) - count * self._scale for part, count in zip(self._parts, self._counts)]
        source = deficits.index(max(deficits))
        try:
            shard, item = self.sources[source].next()
        except ValueError as err:
            raise ValueError(f"mixture source {self.names[source]!r}: {err}") from err
        self.draws += 1
        self._counts[source] += 1
        return source, shard, item

    def reject(self, source: int) -> None:
        """The last draw, from ``source``, gave nothing usable (an undecodable image): it is not
        counted, so the next draw is from the same source and the proportions are of usable items."""
        self.draws -= 1
        self._counts[source] -= 1

    def resharded(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """This worker's state that continues from the mixture ``states`` of the workers of another
        world size (one per old rank, in rank order): each source re-sharded by
        :meth:`ShardedStream.resharded`; the old workers' total draws of each source dealt out one by one over the new workers, source after source. So the new counters sum
        to the old totals, worker ``r`` gets ``floor(draws / W)`` draws plus one for ``r`` below
        the remainder, and each of its counts is the floor or ceiling of its share."""
        num = len(self.sources)
        counts = _deal([sum(int(s["counts"][i]) for s in states) for i in range(num)], self.rank, self.world_size)
        return {"draws": sum(counts), "counts": counts,
                "sources": [source.resharded([s["sources"][i] for s in states]) for i, source in enumerate(self.sources)]}


S = TypeVar("S")  # a shard: a token-shard URL, or a corpus ShardRecord


@dataclass(frozen=True)
class MixtureSource(Generic[S]):
    """One corpus of a training mixture as its workers read it."""

    corpus: str
    weight: float
    shards: list[S]
    dropped: dict[str, frozenset[str]] = field(default_factory=dict)  # shard URL -> keys deduplication dropped

    def kept(self, shard: S, rows: Iterable[R]) -> Iterator[R]:
        """The rows of ``shard`` (each with a ``key``) training reads: the dropped ones left out."""
        dropped = self.dropped.get(_url(shard), frozenset())
        return (row for row in rows if row.key not in dropped)


TokenSource = MixtureSource[str]


def _url(shard: Any) -> str:
    return shard if isinstance(shard, str) else shard.url


def shares_of(count: int, sources: list[MixtureSource[Any]]) -> list[int]:
    """``count`` split over the sources by weight (largest remainders; the counts sum to ``count``):
    how many held-out samples each corpus gives."""
    total = sum(s.weight for s in sources)
    exact = [count * s.weight / total for s in sources]
    parts = [int(x) for x in exact]
    for i in sorted(range(len(sources)), key=lambda i: parts[i] - exact[i])[: count - sum(parts)]:
        parts[i] += 1
    return parts


def without_emptied(source: MixtureSource[S], rows: Callable[[S], int], min_rows: int) -> MixtureSource[S]:
    """``source`` without the shards deduplication emptied (a worker whose share held only those
    would find nothing to read); raises ValueError naming the corpus when fewer than ``min_rows``
    rows are left (each worker needs one)."""
    left = {_url(s): rows(s) - len(source.dropped.get(_url(s), ())) for s in source.shards}
    if (total := sum(left.values())) < min_rows:
        raise ValueError(f"corpus {source.corpus!r}: {total} training rows are left once the images an earlier "
                         f"corpus of the mixture holds are dropped; the stage needs at least {min_rows} (one per "
                         "worker)")
    return replace(source, shards=[s for s in source.shards if left[_url(s)] > 0])


def mixture_stream(sources: list[MixtureSource[S]], rows: Callable[[S], Iterable[Any]],
                   expand: Callable[[Any], list[T]], rank: int, world_size: int, seed: int) -> MixtureStream[T]:
    """A worker's mixture over ``sources``: ``rows(shard)`` reads a shard's rows (each with a
    ``key``), the dropped ones are left out, ``expand(row)`` makes the items. Source ``i`` shuffles
    with seed ``seed + 7919 i`` (a single corpus keeps ``seed``)."""
    def reader(source: MixtureSource[S]) -> Callable[[int], list[T]]:
        def read(i: int) -> list[T]:
            shard = source.shards[i]
            return [item for row in source.kept(shard, rows(shard)) for item in expand(row)]
        return read

    streams = [ShardedStream(len(s.shards), reader(s), rank, world_size, seed + 7919 * i) for i, s in enumerate(sources)]
    return MixtureStream(streams, [s.weight for s in sources], [s.corpus for s in sources])
