"""Durable stages: output locations, completion, and the config subset a stage reads.

A stage's output lives under ``<storage>/<stage>/<identity hash12>/`` (tokenflow.workflow.identity)
and is complete exactly when its ``_MANIFEST.json`` exists (every stage writes it last,
atomically).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenflow import storage
from tokenflow.data.manifest import MANIFEST_NAME


def config_subset(config: dict[str, Any], paths: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{dotted path: value}`` of the config parts a stage reads (missing sections are None),
    without the ``exclude`` dotted paths inside them."""
    out = {}
    for path in paths:
        node: Any = config
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[path] = _without(node, path, exclude)
    return out


def _without(node: Any, path: str, exclude: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
        return node
    return {k: _without(v, f"{path}.{k}", exclude) for k, v in node.items() if f"{path}.{k}" not in exclude}


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
