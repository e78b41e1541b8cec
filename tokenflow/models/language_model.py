"""The transformers causal LM both LLM stages build on."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from tokenflow.config import LanguageModelConfig

log = logging.getLogger(__name__)


def build_language_model(cfg: LanguageModelConfig, vocab_size: int) -> PreTrainedModel:
    """The pretrained LM (embeddings grown to ``vocab_size`` when the tokenizer gained tokens),
    or ``cfg.architecture`` built randomly initialised with ``vocab_size`` entries."""
    if cfg.pretrained is not None:
        lm = AutoModelForCausalLM.from_pretrained(cfg.pretrained, attn_implementation=cfg.attn_implementation,
                                                  dtype=torch.float32)
        if lm.get_input_embeddings().num_embeddings < vocab_size:
            lm.resize_token_embeddings(vocab_size)
    else:
        lm = language_model_from_config({**cfg.architecture, "vocab_size": vocab_size}, cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    return lm


def language_model_from_config(config: dict[str, Any], attn_implementation: str = "sdpa") -> PreTrainedModel:
    """A randomly initialised LM from a transformers config mapping (with ``model_type``)."""
    fields = dict(config)
    model_type = fields.pop("model_type")
    lm_config = AutoConfig.for_model(model_type, **fields)
    return AutoModelForCausalLM.from_config(lm_config, attn_implementation=attn_implementation)


def hidden_size(lm: PreTrainedModel) -> int:
    return int(lm.config.hidden_size)


def freeze_untied_output_head(lm: PreTrainedModel) -> None:
    """Freeze the text LM head when it is not tied to the input embeddings (the generator reads
    hidden states through its own image head, so the text head would get no gradient)."""
    head = lm.get_output_embeddings()
    if head is not None and head.weight is not lm.get_input_embeddings().weight:
        head.requires_grad_(False)
