"""A training stage's data lineage in its MLflow run and manifest: each corpus of its mixture with
the digest of what was read, its weight, its rows, the duplicates dropped and the samples drawn.

The corpora's outputs are also the run's MLflow dataset inputs (``StageRun``); the workers log the
samples drawn per corpus as ``data/<corpus>/examples`` (all workers together) and its realised
share as ``data/<corpus>/share`` with every log step."""

from __future__ import annotations

from typing import Any

from tokenflow.data.dedup import Duplicates
from tokenflow.data.manifest import content_digest
from tokenflow.data.stage_data import StageData, shares
from tokenflow.stages.stage_run import StageRun


def _rows(manifest: dict[str, Any]) -> int:
    """Training rows of a corpus manifest (samples) or of token shards (rows)."""
    block = manifest["splits"]["train"]
    return int(block["rows"] if "rows" in block else block["samples"])


def mixture_table(data: list[StageData], dedup: Duplicates) -> list[dict[str, Any]]:
    """One row per corpus: name, digest and URL of what was read, weight, share, rows, duplicates."""
    share = shares(data)
    report = dedup.report()
    return [{"corpus": d.corpus, "digest": content_digest(d.manifest), "url": d.url, "weight": d.weight,
             "share": share[d.corpus], "rows": _rows(d.manifest),
             "duplicates_dropped": report.get(d.corpus, {}).get("dropped", 0),
             "repeats_within_corpus": report.get(d.corpus, {}).get("within_corpus", 0)} for d in data]


def log_mixture(run: StageRun, data: list[StageData], dedup: Duplicates, phase: str = "") -> list[dict[str, Any]]:
    """Log the mixture table (artifact ``data/<phase>mixture.json``, metrics ``<phase>data/<corpus>/...``:
    weight, rows, duplicates; the workers log the realised share) and return it."""
    table = mixture_table(data, dedup)
    run.log_json(table, f"{phase.replace('/', '_')}mixture.json", "data")
    run.metrics({f"{phase}data/{row['corpus']}/{key}": float(row[key])
                 for row in table for key in ("weight", "rows", "duplicates_dropped", "repeats_within_corpus")})
    return table


def drawn(run: StageRun, table: list[dict[str, Any]], phase: str = "") -> list[dict[str, Any]]:
    """``table`` with each corpus's samples drawn over the whole training (the workers' last
    ``data/<corpus>/examples``) and realised share; None where the run has no such metric."""
    metrics = run.client.get_run(run.run_id).data.metrics
    examples = {row["corpus"]: metrics.get(f"{phase}data/{row['corpus']}/examples") for row in table}
    total = sum(v for v in examples.values() if v is not None)
    return [{**row, "examples": None if (n := examples[row["corpus"]]) is None else int(n),
             "realised_share": n / total if n is not None and total else None} for row in table]
