"""Durable stages: identity hashes, output locations and completion.

A stage's identity is the sha256 of (stage name, the config subset it reads, its inputs'
identities, the code version). Inputs are named by their own identity hashes (a Merkle chain),
so the whole plan is known before anything runs; the manifests' content digests are recorded
in MLflow as the inputs actually read. Output lives under ``<storage>/<stage>/<hash12>/`` and is
complete exactly when its ``_MANIFEST.json`` exists (every stage writes it last, atomically).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenflow import storage
from tokenflow.config import canonical_json
from tokenflow.data.token_shards import MANIFEST_NAME

_PACKAGE = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the ``tokenflow`` package's Python sources (path and bytes, sorted): any code
    change gives every stage a new identity."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def config_subset(config: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """``{dotted path: value}`` of the config parts a stage reads (missing sections are None)."""
    out = {}
    for path in paths:
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[path] = node
    return out


def stage_hash(name: str, config: dict[str, Any], input_hashes: dict[str, str], code: str) -> str:
    """The stage's identity (hex sha256)."""
    return hashlib.sha256(canonical_json({"stage": name, "config": config, "inputs": input_hashes,
                                          "code": code}).encode()).hexdigest()


@dataclass(frozen=True)
class StageOutput:
    """Where one stage instance writes, and whether it finished."""

    name: str
    hash: str
    url: str

    @classmethod
    def under(cls, storage_root: str, name: str, identity: str) -> "StageOutput":
        return cls(name, identity, storage.join(storage_root, name, identity[:12]))

    @property
    def manifest_url(self) -> str:
        return storage.join(self.url, MANIFEST_NAME)

    def complete(self) -> bool:
        return storage.exists(self.manifest_url)

    def manifest(self) -> dict[str, Any]:
        return storage.read_json(self.manifest_url)
