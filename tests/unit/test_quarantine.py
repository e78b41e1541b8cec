"""The quarantine ceiling refuses a corpus that is mostly (or wholly) unusable, saying why."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tokenflow.data.quarantine import QuarantineCeilingExceeded, check_quarantine_ceiling
from tokenflow.data.token_shards import QUARANTINE_SCHEMA


def _quarantine(reasons: list[str]) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(len(reasons))], "split": ["train"] * len(reasons),
                     "shard": ["s.tar"] * len(reasons), "reason": reasons}, schema=QUARANTINE_SCHEMA)


def test_under_the_ceiling_passes():
    check_quarantine_ceiling(_quarantine(["truncated: cut"]), 100, 0.05, "corpus")


def test_over_the_ceiling_names_the_top_reasons_with_examples():
    table = _quarantine(["truncated: cut at 10"] * 4 + ["too_large: 9000x9000"] * 2)
    with pytest.raises(QuarantineCeilingExceeded, match=r"corpus: 6 of 50 samples quarantined \(12\.0%, "
                                                        r"limits.max_quarantine_fraction is 5\.0%\); most frequent: "
                                                        r"truncated x4 \('k0', 'k1', 'k2'\); too_large x2 \('k4', 'k5'\)"):
        check_quarantine_ceiling(table, 50, 0.05, "corpus")


@pytest.mark.parametrize("samples,reasons", [(0, []), (3, ["empty"] * 3)])
def test_an_empty_or_all_bad_corpus_never_passes(samples, reasons):
    with pytest.raises(QuarantineCeilingExceeded):
        check_quarantine_ceiling(_quarantine(reasons), samples, 1.0, "corpus")
