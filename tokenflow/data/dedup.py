"""Exact duplicate images across the corpora of a mixture, by the sha256 of their bytes.

A training stage mixing several corpora drops a sample that already occurs in a corpus earlier
in its ``data`` list (first occurrence wins: mixture order, then shard order, then row order), so
one sample is not trained on more often than its corpus's weight says. What counts as the same
sample is the stage's ``dedup``: the same image bytes (``images``), or the same image with the
same text (``pairs``: instruction sets ask new questions about the same images). Repeats inside
one corpus are counted, not dropped: LLaVA-style data asks several conversations about one image,
a caption dataset may pair one image with several captions.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Duplicates:
    """Per corpus: keys dropped per shard, how many were dropped, and repeats within the corpus."""

    dropped: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # corpus -> shard -> keys
    counts: dict[str, int] = field(default_factory=dict)  # corpus -> samples dropped
    within: dict[str, int] = field(default_factory=dict)  # corpus -> repeats inside it (kept)

    def report(self) -> dict[str, dict[str, int]]:
        """What a stage manifest records: per corpus, dropped and within-corpus repeats."""
        return {c: {"dropped": self.counts.get(c, 0), "within_corpus": self.within.get(c, 0)} for c in self.within}


DIGEST_BYTES = 16  # of the sha256: collisions stay out of reach at billions of samples
READ_AHEAD = 16  # shards whose digests are read concurrently (object storage answers slowly)


def find_duplicates(corpora: list[tuple[str, list[str]]],
                    digests: Callable[[str], Iterable[tuple[str, str]]]) -> Duplicates:
    """:class:`Duplicates` of ``corpora`` (``(name, shard ids)`` in mixture order);
    ``digests(shard)`` yields the shard's ``(key, image sha256 hex)`` in row order. A single corpus
    is not read (nothing to drop).

    The digests seen so far are one sorted array of 16-byte values (16 bytes a sample, not the
    ~100 of a Python set), and shards are read ``READ_AHEAD`` at a time, in order."""
    result = Duplicates()
    if len(corpora) < 2:
        return result
    earlier = np.empty(0, dtype=f"S{DIGEST_BYTES}")  # sorted, unique
    for name, shards in corpora:
        leading = _leading_words(earlier)
        fresh: list[np.ndarray] = []  # this corpus's digests not in an earlier corpus
        dropped: dict[str, frozenset[str]] = {}
        for shard, rows in _read_in_order(shards, digests):
            keys, values = _checked(shard, rows)
            repeat = _members(values, earlier, leading)
            if repeat.any():
                dropped[shard] = frozenset(keys[i] for i in np.flatnonzero(repeat))
            fresh.append(values[~repeat])
        mine = np.concatenate(fresh) if fresh else earlier[:0]
        mine.sort()
        unique = mine[np.concatenate(([True], mine[1:] != mine[:-1]))] if len(mine) else mine
        result.dropped[name], result.counts[name] = dropped, sum(map(len, dropped.values()))
        result.within[name] = len(mine) - len(unique)
        earlier = np.concatenate((earlier, unique))  # disjoint: fresh digests are in no earlier corpus
        earlier.sort()
    return result


def _read_in_order(shards: list[str], digests: Callable[[str], Iterable[tuple[str, str]]]
                   ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """``(shard, its rows)`` in shard order, up to ``READ_AHEAD`` shards read ahead."""
    pool = ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="dedup-read")
    try:
        pending: deque = deque()
        for shard in shards:
            pending.append((shard, pool.submit(lambda s: list(digests(s)), shard)))
            if len(pending) >= READ_AHEAD:
                shard_id, future = pending.popleft()
                yield shard_id, future.result()
        while pending:
            shard_id, future = pending.popleft()
            yield shard_id, future.result()
    finally:  # a bad shard fails at once, not after the reads ahead of it
        pool.shutdown(wait=False, cancel_futures=True)


def _leading_words(digests: np.ndarray) -> np.ndarray:
    """Each digest's first 8 bytes as a native integer: bytewise order is big-endian integer order,
    so a sorted digest array gives a sorted result, searched much faster than the strings."""
    return digests.view(">u8")[::2].astype(np.uint64)


def _members(values: np.ndarray, sorted_set: np.ndarray, leading: np.ndarray) -> np.ndarray:
    """Which of ``values`` occur in the sorted array ``sorted_set`` (``leading``: its
    :func:`_leading_words`); a run of entries sharing their first 8 bytes is searched whole."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool)
    wanted = _leading_words(values)
    left, right = np.searchsorted(leading, wanted, "left"), np.searchsorted(leading, wanted, "right")
    found = sorted_set[np.minimum(left, len(sorted_set) - 1)] == values
    for i in np.flatnonzero(right - left > 1):  # shared first 8 bytes: vanishingly rare in sha256s
        found[i] = values[i] in sorted_set[left[i]:right[i]]
    return found


def _checked(shard: str, rows: list[tuple[str, str]]) -> tuple[list[str], np.ndarray]:
    """The rows' keys and truncated digests; ValueError naming a row without a sha256 digest."""
    keys, hexes = [k for k, _ in rows], [d for _, d in rows]
    try:
        raw = bytes.fromhex("".join(hexes)) if set(map(len, hexes)) <= {64} else b""
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32 * len(rows):  # fromhex skips whitespace: the length catches it too
        for key, digest in rows:
            if not _is_sha256_hex(digest):
                raise ValueError(f"{shard}: sample {key!r} has no sha256 image digest ({digest!r})")
    table = np.frombuffer(raw, dtype=np.uint8).reshape(len(rows), 32)
    return keys, np.ascontiguousarray(table[:, :DIGEST_BYTES]).view(f"S{DIGEST_BYTES}").ravel()


def _is_sha256_hex(digest: object) -> bool:
    try:
        return isinstance(digest, str) and len(digest) == 64 and len(bytes.fromhex(digest)) == 32
    except ValueError:
        return False


def token_shard_digests(url: str, pairs: bool = False) -> list[tuple[str, str]]:
    """``(key, digest)`` of every row of a token shard: its image's sha256, or with ``pairs`` the
    sha256 of the image's digest with the row's caption and metadata (reads only those columns)."""
    from tokenflow.data.token_shards import read_table

    cols = read_table(url, ["key", "image_sha256"] + (["caption", "json"] if pairs else [])).to_pydict()
    if not pairs:
        return list(zip(cols["key"], cols["image_sha256"]))
    return [(key, hashlib.sha256(json.dumps([image, caption, meta]).encode()).hexdigest() if image else image)
            for key, image, caption, meta in zip(cols["key"], cols["image_sha256"], cols["caption"], cols["json"])]
