"""Tokenizer weights as safetensors: the state dict plus the config that rebuilds the model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import torch.nn.functional as F

from tokenflow.config import TokenizerConfig, TokenizerView, canonical_json
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


_PIXEL_DECODER_PREFIX = "pixel_decoder."


def start_decoder_finetune(model: TokenFlowTokenizer, trained_path: str | Path) -> bool:
    """Load a trained tokenizer export into ``model`` for the decoder-only fine-tune and freeze
    everything but the pixel decoder. Every other tensor must match the export exactly (so the
    tokens cannot change); a pixel decoder of the trained shape starts from the trained weights,
    a different one (the enhanced decoder) from its fresh initialisation. Returns whether the
    decoder was loaded."""
    from safetensors.torch import load_file

    state = load_file(str(trained_path))
    expected = model.state_dict()
    decoder = {k: v for k, v in state.items() if k.startswith(_PIXEL_DECODER_PREFIX)}
    same_decoder = (decoder.keys() == {k for k in expected if k.startswith(_PIXEL_DECODER_PREFIX)}
                    and all(v.shape == expected[k].shape for k, v in decoder.items()))
    if not same_decoder:
        state = {k: v for k, v in state.items() if not k.startswith(_PIXEL_DECODER_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if same_decoder or not k.startswith(_PIXEL_DECODER_PREFIX)]
    if missing or unexpected:
        raise ValueError(f"{trained_path} does not fit this tokenizer: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.requires_grad_(False)
    model.pixel_decoder.requires_grad_(True)
    return same_decoder


def restore_frozen(model: TokenFlowTokenizer, trained_path: str | Path) -> None:
    """Copy every tensor but the pixel decoder back from the trained export (after a decoder
    fine-tune, so a lower-precision engine cannot have rounded the frozen weights)."""
    from safetensors.torch import load_file

    frozen = {k: v for k, v in load_file(str(trained_path)).items() if not k.startswith(_PIXEL_DECODER_PREFIX)}
    with torch.no_grad():
        model.load_state_dict(frozen, strict=False)


def _grid_split(length: int) -> tuple[int, int] | None:
    """``(prefix tokens, grid side)`` of a position table of ``length`` rows (0 or 1 prefix)."""
    for prefix in (1, 0):
        side = round((length - prefix) ** 0.5)
        if side > 0 and side * side == length - prefix:
            return prefix, side
    return None


def resize_grid_embedding(table: torch.Tensor, length: int) -> torch.Tensor:
    """A position table ``[..., prefix + g*g, W]`` resized to ``length`` rows: the prefix rows
    (a class token's) kept, the g x g grid rows interpolated bicubically to the new grid."""
    old, new = _grid_split(table.shape[-2]), _grid_split(length)
    if old is None or new is None or old[0] != new[0]:
        raise ValueError(f"cannot resize a {table.shape[-2]}-row position table to {length} rows")
    prefix, side = old
    lead, width = table.shape[:-2], table.shape[-1]
    flat = table.reshape(-1, table.shape[-2], width)
    grid = flat[:, prefix:].reshape(-1, side, side, width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new[1], new[1]), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(flat.shape[0], -1, width).to(table.dtype)
    return torch.cat([flat[:, :prefix], grid], dim=1).reshape(*lead, length, width)


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu",
                   view: TokenizerView | None = None) -> TokenFlowTokenizer:
    """Rebuild a tokenizer from a file written by :func:`save_tokenizer` (strict key match).

    With ``view`` the tokenizer is rebuilt at the view's image size and scales, its position
    embeddings (semantic tower, semantic decoder) interpolated to the new grid; every other
    tensor, the codebooks included, loads unchanged."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer weights not found: {path}")
    cfg = read_tokenizer_config(path)
    if view is not None:
        cfg = cfg.at_view(view)
    state = load_file(str(path), device=str(map_location))
    with_teacher = any(k.startswith(_TEACHER_PREFIX) for k in state)
    model = TokenFlowTokenizer(cfg, with_teacher=with_teacher, structure_only=True)
    if view is not None:
        expected = model.state_dict()
        state = {k: resize_grid_embedding(v, expected[k].shape[-2])
                 if k in expected and v.shape != expected[k].shape else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
