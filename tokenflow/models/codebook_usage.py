"""Codebook usage and perplexity over a sliding window of batches."""

from __future__ import annotations

from collections import deque

import torch


def usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float]:
    """(fraction of codes used, exp(entropy) of the code distribution) from per-code counts."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


class CodebookUsage:
    """Counts code indices over the last ``window`` updates.

    ``usage`` is the fraction of the K codes used at least once in the window; ``perplexity`` is
    exp(entropy) of the windowed code distribution (K when uniform, 1 when collapsed).
    """

    def __init__(self, codebook_size: int, window: int):
        self.codebook_size = codebook_size
        self._batches: deque[torch.Tensor] = deque(maxlen=window)
        self._total = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: torch.Tensor) -> None:
        """Add one batch of indices (any shape)."""
        counts = torch.bincount(indices.detach().reshape(-1).cpu(), minlength=self.codebook_size)
        if len(self._batches) == self._batches.maxlen:
            self._total -= self._batches[0]
        self._batches.append(counts)
        self._total += counts

    @property
    def counts(self) -> torch.Tensor:
        return self._total.clone()

    def usage(self) -> float:
        return usage_and_perplexity(self._total)[0]

    def perplexity(self) -> float:
        return usage_and_perplexity(self._total)[1]
