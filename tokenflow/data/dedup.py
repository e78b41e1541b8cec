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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Duplicates:
    """Per corpus: keys dropped per shard, how many were dropped, and repeats within the corpus."""

    dropped: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)  # corpus -> shard -> keys
    counts: dict[str, int] = field(default_factory=dict)  # corpus -> samples dropped
    within: dict[str, int] = field(default_factory=dict)  # corpus -> repeats inside it (kept)

    def report(self) -> dict[str, dict[str, int]]:
        """What a stage manifest records: per corpus, dropped and within-corpus repeats."""
        return {c: {"dropped": self.counts.get(c, 0), "within_corpus": self.within.get(c, 0)} for c in self.within}


def find_duplicates(corpora: list[tuple[str, list[str]]],
                    digests: Callable[[str], Iterable[tuple[str, str]]]) -> Duplicates:
    """:class:`Duplicates` of ``corpora`` (``(name, shard ids)`` in mixture order);
    ``digests(shard)`` yields the shard's ``(key, image sha256 hex)`` in row order. A single corpus
    is not read (nothing to drop)."""
    result = Duplicates()
    if len(corpora) < 2:
        return result
    earlier: set[bytes] = set()
    for name, shards in corpora:
        mine: set[bytes] = set()
        dropped: dict[str, frozenset[str]] = {}
        count = within = 0
        for shard in shards:
            keys = []
            for key, digest in _checked(shard, digests(shard)):
                d = bytes.fromhex(digest)[:16]  # 128 bits: collisions are out of reach, memory halves
                if d in earlier:
                    keys.append(key)
                elif d in mine:
                    within += 1
                mine.add(d)
            if keys:
                dropped[shard] = frozenset(keys)
                count += len(keys)
        earlier |= mine
        result.dropped[name], result.counts[name], result.within[name] = dropped, count, within
    return result


def _checked(shard: str, rows: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    for key, digest in rows:
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"{shard}: sample {key!r} has no sha256 image digest ({digest!r})")
        yield key, digest


def token_shard_digests(url: str, pairs: bool = False) -> list[tuple[str, str]]:
    """``(key, digest)`` of every row of a token shard: its image's sha256, or with ``pairs`` the
    sha256 of the image's digest with the row's caption and metadata (reads only those columns)."""
    from tokenflow.data.token_shards import read_table

    cols = read_table(url, ["key", "image_sha256"] + (["caption", "json"] if pairs else [])).to_pydict()
    if not pairs:
        return list(zip(cols["key"], cols["image_sha256"]))
    return [(key, hashlib.sha256(json.dumps([image, caption, meta]).encode()).hexdigest() if image else image)
            for key, image, caption, meta in zip(cols["key"], cols["image_sha256"], cols["caption"], cols["json"])]
