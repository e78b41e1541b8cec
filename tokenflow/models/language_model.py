"""The transformers causal LM both LLM stages build on."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
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


class HeadRMSNorm(nn.Module):
    """A query or key projection followed by RMSNorm over each head's slice of its output
    (learned scale, fp32 statistics, eps 1e-6): QK-norm before the rotary embedding, placed
    where Qwen3 has it natively and the TokenFlow reference patches it into Llama."""

    def __init__(self, proj: nn.Module, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.proj = proj
        self.head_dim = head_dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.proj(hidden)
        heads = out.view(*out.shape[:-1], -1, self.head_dim).float()
        heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * heads.to(out.dtype)).to(out.dtype).view(out.shape)


def add_qk_norm(lm: PreTrainedModel) -> bool:
    """Give every attention layer QK-norm unless the architecture has it (``q_norm``/``k_norm``,
    e.g. Qwen3). Returns whether layers were patched; raises ``ValueError`` for attention
    modules without ``q_proj``/``k_proj``. Idempotent."""
    attentions = [m for name, m in lm.named_modules() if name.endswith("self_attn")]
    if not attentions:
        raise ValueError(f"{type(lm).__name__}: no self_attn modules to add QK-norm to")
    patched = False
    for attn in attentions:
        if hasattr(attn, "q_norm") or isinstance(getattr(attn, "q_proj", None), HeadRMSNorm):
            continue
        if not (hasattr(attn, "q_proj") and hasattr(attn, "k_proj") and hasattr(attn, "head_dim")):
            raise ValueError(f"{type(attn).__name__} has no q_proj/k_proj/head_dim: cannot add QK-norm")
        attn.q_proj = HeadRMSNorm(attn.q_proj, attn.head_dim)
        attn.k_proj = HeadRMSNorm(attn.k_proj, attn.head_dim)
        patched = True
    return patched
