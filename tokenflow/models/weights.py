"""Tokenizer weights as safetensors: the state dict plus the config that rebuilds the model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tokenflow.config import TokenizerConfig, canonical_json
from tokenflow.models.tokenizer import TokenFlowTokenizer

FORMAT = "tokenflow-tokenizer/1"
_TEACHER_PREFIX = "teacher."
# safetensors writes metadata keys in hash-map order; one key keeps the file bytes deterministic.
_METADATA_KEY = "tokenflow"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _rebuildable_config(model: TokenFlowTokenizer) -> TokenizerConfig:
    """The model's config with the semantic tower pinned to its resolved architecture, so loading
    rebuilds it offline (no pretrained source) before the saved weights replace it."""
    tower = model.cfg.semantic_encoder.model_copy(
        update={"pretrained": None, "overrides": model.semantic_encoder.architecture}
    )
    return model.cfg.model_copy(update={"semantic_encoder": tower})


def save_tokenizer(model: TokenFlowTokenizer, path: str | Path, include_teacher: bool = True) -> str:
    """Write the model to ``path`` (.safetensors); returns the file's sha256.

    ``include_teacher=False`` writes the inference-only export (no distillation teacher).
    """
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if include_teacher or not k.startswith(_TEACHER_PREFIX)
    }
    metadata = {_METADATA_KEY: canonical_json(
        {"format": FORMAT, "config": _rebuildable_config(model).model_dump(mode="json")}
    )}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return file_sha256(path)


def read_tokenizer_config(path: str | Path) -> TokenizerConfig:
    """The config stored in a tokenizer weights file."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(_METADATA_KEY)
    info = json.loads(raw) if raw else {}
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: not a TokenFlow tokenizer file (format {info.get('format')!r})")
    return TokenizerConfig.model_validate(info["config"])


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> TokenFlowTokenizer:
    """Rebuild a tokenizer from a file written by :func:`save_tokenizer` (strict key match)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer weights not found: {path}")
    cfg = read_tokenizer_config(path)
    state = load_file(str(path), device=str(map_location))
    with_teacher = any(k.startswith(_TEACHER_PREFIX) for k in state)
    model = TokenFlowTokenizer(cfg, with_teacher=with_teacher)
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
