"""Durable stages: output locations, completion, and the config subset a stage reads.

A stage's output lives under ``<storage>/<stage>/<identity hash12>/`` (tokenflow.workflow.identity).

The commit protocol, the same on local disk and on object stores (which have no rename): a stage
writes its data objects first (each one whole: a temp file renamed into place locally, a single
upload on object stores, which publish an object only when its upload completes), then
``_MANIFEST.json`` last, listing every file it wrote with its size. A stage is complete exactly
when its manifest exists and every file it lists is present at that size; otherwise it runs
again (resuming what it can). Content digests live in the manifests of the stages that make
them (token shards, exports, results) and are checked by their readers and by
``tokenflow shards verify``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenflow import storage
from tokenflow.data.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)


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
        """The manifest is present and every file it lists is there at its size."""
        try:
            manifest = self.manifest()
        except FileNotFoundError:
            return False
        if problems := missing_files(self.url, manifest.get("files", {})):
            log.warning("%s: manifest present but %s; the stage runs again", self.url, "; ".join(problems[:5]))
            return False
        return True

    def manifest(self) -> dict[str, Any]:
        return storage.read_json(self.manifest_url)


def missing_files(url: str, expected: dict[str, int]) -> list[str]:
    """What differs between ``expected`` ({relative path: bytes}) and the files under ``url``."""
    found = storage.file_sizes(url)
    return [f"{rel} missing" if rel not in found else f"{rel} is {found[rel]} bytes, not {size}"
            for rel, size in sorted(expected.items()) if found.get(rel) != size]
