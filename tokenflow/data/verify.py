"""``tokenflow shards verify``: check a token-shard output against its manifest."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc

from tokenflow import storage
from tokenflow.data.manifest import MANIFEST_NAME, file_digest
from tokenflow.data.token_shards import read_shard_info, read_table, token_schema


def _check_shard(out_url: str, split: str, entry: dict[str, Any], manifest: dict[str, Any],
                 quarantined_keys: set[tuple[str, str, str]]) -> list[str]:
    where = f"{split}/{entry['name']}"
    url = storage.join(out_url, entry["path"])
    if not storage.exists(url):
        return [f"{where}: file missing"]
    problems = []
    size, sha = file_digest(url)
    if (size, sha) != (entry["bytes"], entry["sha256"]):
        problems.append(f"{where}: content differs from the manifest (sha256 {sha[:12]} != {entry['sha256'][:12]})")
    info = read_shard_info(url)
    if list(info.scales) != manifest["scales"] or info.codebook_size != manifest["codebook_size"]:
        problems.append(f"{where}: scales/codebook size differ from the manifest")
    table = read_table(url)
    if not table.schema.equals(token_schema(info), check_metadata=False):
        problems.append(f"{where}: schema {table.schema} is not the token-shard schema")
        return problems
    if table.num_rows != entry["rows"]:
        problems.append(f"{where}: {table.num_rows} rows, manifest says {entry['rows']}")
    if entry["rows"] + entry["quarantined"] != entry["source_samples"]:
        problems.append(f"{where}: {entry['rows']} rows + {entry['quarantined']} quarantined "
                        f"!= {entry['source_samples']} source samples")
    lengths = pc.list_value_length(table.column("tokens")).to_numpy()
    if table.num_rows and not np.all(lengths == info.num_tokens):
        problems.append(f"{where}: rows with a token count other than {info.num_tokens}")
    values = table.column("tokens").combine_chunks().flatten()
    if len(values) and pc.max(values).as_py() >= info.codebook_size:
        problems.append(f"{where}: token index >= codebook size {info.codebook_size}")
    keys = table.column("key").to_pylist()
    if len(set(keys)) != len(keys):
        problems.append(f"{where}: duplicate keys")
    both = {k for k in keys if (split, entry["source"], k) in quarantined_keys}
    if both:
        problems.append(f"{where}: {len(both)} keys are both tokenized and quarantined")
    return problems


def verify_token_shards(out_url: str) -> list[str]:
    """Every problem found (an empty list means the output is intact and reconciles)."""
    manifest_url = storage.join(out_url, MANIFEST_NAME)
    if not storage.exists(manifest_url):
        return [f"{manifest_url}: no manifest (the stage did not finish)"]
    manifest = storage.read_json(manifest_url)
    problems: list[str] = []
    q_entry = manifest["quarantine"]
    q_url = storage.join(out_url, q_entry["path"])
    quarantined: set[tuple[str, str, str]] = set()
    per_shard: Counter[tuple[str, str]] = Counter()
    if not storage.exists(q_url):
        problems.append(f"{q_entry['path']}: missing")
    else:
        if file_digest(q_url) != (q_entry["bytes"], q_entry["sha256"]):
            problems.append(f"{q_entry['path']}: content differs from the manifest")
        rows = read_table(q_url).to_pylist()
        if len(rows) != q_entry["rows"]:
            problems.append(f"{q_entry['path']}: {len(rows)} rows, manifest says {q_entry['rows']}")
        for row in rows:
            if row["reason"] != "duplicate_key":  # a repeated key's first sample is tokenized
                quarantined.add((row["split"], row["shard"], row["key"]))
            per_shard[(row["split"], row["shard"])] += 1
    for split, block in manifest["splits"].items():
        for entry in block["shards"]:
            problems += _check_shard(out_url, split, entry, manifest, quarantined)
            if per_shard[(split, entry["source"])] != entry["quarantined"]:
                problems.append(f"{split}/{entry['name']}: quarantine file has "
                                f"{per_shard[(split, entry['source'])]} rows for it, manifest says "
                                f"{entry['quarantined']}")
    return problems
