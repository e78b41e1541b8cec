"""Bounded parsing of a sample's metadata JSON (conversations, questions, scene records).

Metadata comes with the corpus, so it is untrusted: its size is checked first, then its nesting
depth on the raw text (Python's parser recurses per level and a deeply nested document raises
RecursionError, not a JSON error), then it is parsed. Every failure is a
:class:`SampleJSONError` with a quarantine-style ``reason``.
"""

from __future__ import annotations

import json
from typing import Any

from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig


class SampleJSONError(ValueError):
    """Metadata that cannot be used; ``reason`` is ``json_too_large``, ``json_too_deep``,
    ``json_invalid`` or ``json_schema``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects outside strings (one linear pass)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_sample_json(raw: str | bytes, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> Any:
    """The parsed document, within ``limits.max_json_bytes`` and ``limits.max_json_depth``."""
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > limits.max_json_bytes:
        raise SampleJSONError("json_too_large", f"{size} bytes exceed max_json_bytes={limits.max_json_bytes}")
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if (depth := _depth(text)) > limits.max_json_depth:
        raise SampleJSONError("json_too_deep", f"nesting {depth} exceeds max_json_depth={limits.max_json_depth}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise SampleJSONError("json_invalid", f"not JSON: {exc}") from None


def parse_sample_object(raw: str | bytes, required: dict[str, type],
                        limits: SampleLimitsConfig = DEFAULT_LIMITS) -> dict[str, Any]:
    """A JSON object holding at least ``required`` (key -> type); else ``json_schema``."""
    record = parse_sample_json(raw, limits)
    if not isinstance(record, dict):
        raise SampleJSONError("json_schema", f"a JSON {type(record).__name__}, not an object")
    for key, kind in required.items():
        if not isinstance(record.get(key), kind):
            raise SampleJSONError("json_schema", f"no {kind.__name__} under {key!r}")
    return record
