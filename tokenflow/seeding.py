"""Seeds derived from integers, stable across processes and machines."""

from __future__ import annotations

import numpy as np


def seed_for(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes, unlike str hashes)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)
