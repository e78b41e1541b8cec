"""Inference exports of the LLM stages: one safetensors file plus the text tokenizer directory.

``<dir>/model.safetensors`` holds every tensor of the wrapper (LM, projector or image head and
embeddings, the frozen codebooks) and, in its metadata, what rebuilds the module: the kind, the
LM's transformers config, the codebook scales and the special token ids. ``<dir>/text_tokenizer/``
is the tokenizer training used, saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.models.generator import NextScaleGenerator
from tokenflow.models.language_model import language_model_from_config
from tokenflow.models.quantizer import CodebookFeatures
from tokenflow.models.understanding import UnderstandingModel

_META_KEY = "tokenflow"
WEIGHTS_NAME = "model.safetensors"
TEXT_TOKENIZER_DIR = "text_tokenizer"


def save_text_tokenizer(tok: PreTrainedTokenizerBase, url: str) -> None:
    """``save_pretrained`` into ``url`` (any fsspec URL), file by file."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            storage.write_bytes_atomic(storage.join(url, path.name), path.read_bytes())


def load_text_tokenizer_dir(url: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(storage.local_path(url)))


def save_llm(state: dict[str, torch.Tensor], meta: dict[str, Any], url: str) -> None:
    """Write an export's weights with ``meta`` (deterministic bytes for equal inputs)."""
    from safetensors.torch import save

    payload = save(dict(sorted(state.items())),
                   metadata={_META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    storage.write_bytes_atomic(url, payload)


def read_weights(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load

    if not storage.exists(url):
        raise FileNotFoundError(f"model weights not found: {url}")
    raw = storage.read_bytes(url)
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, JSON header
    header = json.loads(raw[8 : 8 + header_len])
    return load(raw), json.loads(header["__metadata__"][_META_KEY])


def _codebook(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> CodebookFeatures:
    return CodebookFeatures(tuple(meta["scales"]), state["codebook.semantic"], state["codebook.pixel"])


def generator_meta(model: NextScaleGenerator, attn_implementation: str) -> dict[str, Any]:
    """What :func:`load_generator` rebuilds a generator from (besides the LM's config)."""
    return {"kind": "generator", "scales": list(model.scales), "image_start_id": model.image_start_id,
            "image_end_id": model.image_end_id, "qk_norm": model.qk_norm,
            "attn_implementation": attn_implementation}


def load_generator(export_dir: str) -> tuple[NextScaleGenerator, PreTrainedTokenizerBase]:
    """The generator and its text tokenizer from a ``train_generator`` export directory."""
    state, meta = read_weights(storage.join(export_dir, WEIGHTS_NAME))
    if meta.get("kind") != "generator":
        raise ValueError(f"{export_dir}: not a generator export (kind {meta.get('kind')!r})")
    lm = language_model_from_config(meta["lm_config"], meta.get("attn_implementation", "sdpa"))
    model = NextScaleGenerator(lm, _codebook(meta, state), meta["image_start_id"], meta["image_end_id"],
                               meta["qk_norm"])
    model.load_state_dict(state, strict=True)
    return model.eval(), load_text_tokenizer_dir(storage.join(export_dir, TEXT_TOKENIZER_DIR))


def load_understanding(export_dir: str) -> tuple[UnderstandingModel, PreTrainedTokenizerBase]:
    """The understanding model and its text tokenizer from a ``train_understanding`` export."""
    state, meta = read_weights(storage.join(export_dir, WEIGHTS_NAME))
    if meta.get("kind") != "understanding":
        raise ValueError(f"{export_dir}: not an understanding export (kind {meta.get('kind')!r})")
    lm = language_model_from_config(meta["lm_config"], meta.get("attn_implementation", "sdpa"))
    model = UnderstandingModel(lm, _codebook(meta, state), meta["bos_id"])
    model.load_state_dict(state, strict=True)
    return model.eval(), load_text_tokenizer_dir(storage.join(export_dir, TEXT_TOKENIZER_DIR))
