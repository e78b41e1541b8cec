"""The quarantine ceiling: a corpus whose share of unusable samples is past a limit is refused
with what went wrong, instead of training on what is left."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa


class QuarantineCeilingExceeded(RuntimeError):
    """Too many of a corpus's samples were quarantined (or none was usable)."""


def reason_code(reason: str) -> str:
    """The machine-readable head of a quarantine reason (``truncated: <details>`` -> ``truncated``)."""
    return reason.split(":", 1)[0].strip()


def summarize(quarantine: pa.Table, top: int = 5, examples: int = 3) -> str:
    """The most frequent reasons with counts and example keys, e.g. ``truncated x12 (a, b, c)``."""
    keys, reasons = quarantine.column("key").to_pylist(), quarantine.column("reason").to_pylist()
    by_reason: dict[str, list[str]] = {}
    for key, reason in zip(keys, reasons):
        by_reason.setdefault(reason_code(reason), []).append(key)
    counts = Counter({code: len(found) for code, found in by_reason.items()})
    return "; ".join(f"{code} x{n} ({', '.join(repr(k[:80]) for k in by_reason[code][:examples])})"
                     for code, n in counts.most_common(top))


def check_quarantine_ceiling(quarantine: pa.Table, samples: int, max_fraction: float, where: str) -> None:
    """Raise when no sample of ``samples`` was usable or more than ``max_fraction`` of them were
    quarantined (``quarantine`` lists them; ``where`` names the corpus for the message)."""
    if samples == 0:
        raise QuarantineCeilingExceeded(f"{where}: the corpus has no samples")
    share = quarantine.num_rows / samples
    if quarantine.num_rows == samples or share > max_fraction:
        raise QuarantineCeilingExceeded(
            f"{where}: {quarantine.num_rows} of {samples} samples quarantined ({share:.1%}, "
            f"limits.max_quarantine_fraction is {max_fraction:.1%}); most frequent: {summarize(quarantine)}")
