"""What a training stage reads from each corpus of its mixture: the corpus's weight and the
upstream output that holds its samples (the corpus manifest for the tokenizer, token shards for
the LLM stages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageData:
    """One corpus of a stage's mixture."""

    corpus: str
    weight: float
    manifest: dict[str, Any]  # the upstream output's manifest
    url: str  # the upstream output's URL


def shares(data: list[StageData]) -> dict[str, float]:
    """Each corpus's share of the samples (weights normalised)."""
    total = sum(d.weight for d in data)
    return {d.corpus: d.weight / total for d in data}
