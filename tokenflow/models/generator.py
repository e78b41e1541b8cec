"""Text-to-image next-scale prediction inside a causal LM.

Sequence layout (left-padded text so every sample's image block starts at the same index):

    [pad ...] <s> caption tokens | scale 0 block | scale 1 block | ... | scale n-1 block | <eoi>

Scale 0's block holds ``s0*s0`` positions fed the ``<boi>`` embedding; scale j's block holds
``s_j*s_j`` positions fed the teacher-forcing features (codes accumulated over scales < j,
area-downsampled to s_j) through a 2-layer GELU MLP (the reference's ``mlp2x_gelu``), plus a
level embedding and a learned per-position embedding. The hidden state of scale j's positions
predicts scale j's tokens through the image head; the loss covers image tokens only (the
reference's ``ignore_text_loss``). Attention is block-causal (:func:`block_causal_mask`): text
is causal, every image position sees the text and all positions of its own and earlier scales,
never a later scale. Training replaces a fraction of the captions by the empty prompt (``<s>``
alone); sampling's unconditional branch is a configurable negative prompt (empty by default).
With ``qk_norm`` an LM without native QK-norm (Llama) gets it, as the reference patches it in.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from tokenflow.models.language_model import add_qk_norm, freeze_untied_output_head, hidden_size
from tokenflow.models.quantizer import CodebookFeatures

log = logging.getLogger(__name__)


class TextBatch(NamedTuple):
    """Left-padded prompt ids [B, T] and their validity mask [B, T] (bool)."""

    ids: torch.Tensor
    mask: torch.Tensor


def left_pad(sequences: list[list[int]], pad_id: int) -> TextBatch:
    """Left-pad id lists into a :class:`TextBatch`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = True
    return TextBatch(ids, mask)


def block_ids(text_len: int, scales: tuple[int, ...], scales_shown: int, with_end: bool) -> torch.Tensor:
    """Attention block of every position: text position i is block i; scale j is block
    ``text_len + j``; the end marker is the last block. A query sees keys of blocks <= its own."""
    parts = [torch.arange(text_len)]
    parts += [torch.full((s * s,), text_len + j) for j, s in enumerate(scales[:scales_shown])]
    if with_end:
        parts.append(torch.tensor([text_len + scales_shown]))
    return torch.cat(parts)


def block_causal_mask(blocks: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, T, T]: 0 where a query may attend a key, the dtype's minimum
    elsewhere. ``key_valid`` [B, T] masks padding; every position always sees itself."""
    allowed = blocks[None, :, None] >= blocks[None, None, :]  # [1, T(query), T(key)]
    allowed = allowed & key_valid[:, None, :]
    allowed = allowed | torch.eye(blocks.numel(), dtype=torch.bool, device=blocks.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=blocks.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class GeneratorOutput(NamedTuple):
    loss: torch.Tensor  # mean cross-entropy over all image-token positions
    logits: torch.Tensor  # [B, num_tokens, K]


def scale_losses(logits: torch.Tensor, tokens: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
    """Mean cross-entropy of each scale's tokens, ``[len(scales)]``, from teacher-forced
    ``logits`` [B, L, K] and target ``tokens`` [B, L]: which scales the generator cannot predict."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
    return torch.stack([part.mean() for part in ce.view(tokens.shape).split([s * s for s in scales], dim=1)])


class ImageInputEmbedding(nn.Module):
    """Inputs of the image blocks: the start-marker embedding for scale 0, projected
    teacher-forcing features for later scales, plus a level and a per-position embedding.
    (A module of its own so ZeRO-3 gathers these parameters on every call, in sampling too.)"""

    def __init__(self, feature_dim: int, width: int, scales: tuple[int, ...]):
        super().__init__()
        self.scales = scales
        self.feature_proj = nn.Sequential(nn.Linear(feature_dim, width), nn.GELU(), nn.Linear(width, width))
        self.level = nn.Parameter(torch.randn(len(scales), width) * 0.02)
        self.position = nn.Parameter(torch.randn(sum(s * s for s in scales), width) * 0.02)

    def forward(self, start: torch.Tensor, scale_inputs: list[torch.Tensor]) -> torch.Tensor:
        """``start`` [B, s0*s0, H] and scale inputs [B, s_j*s_j, D] for j = 1.. -> [B, n, H]."""
        blocks = [start] + [self.feature_proj(x.to(start.dtype)) for x in scale_inputs]
        out, offset = [], 0
        for j, block in enumerate(blocks):
            n = self.scales[j] ** 2
            out.append(block + self.level[j] + self.position[offset : offset + n])
            offset += n
        return torch.cat(out, dim=1)


class NextScaleGenerator(nn.Module):
    """A causal LM with image input embeddings and an image head over the codebook."""

    def __init__(self, lm: PreTrainedModel, codebook: CodebookFeatures, image_start_id: int,
                 image_end_id: int, qk_norm: bool):
        super().__init__()
        if qk_norm and add_qk_norm(lm):
            log.info("added QK-norm to %s's attention layers", type(lm).__name__)
        self.qk_norm = qk_norm
        self.lm = lm
        self.codebook = codebook
        self.image_start_id, self.image_end_id = image_start_id, image_end_id
        width = hidden_size(lm)
        self.image_inputs = ImageInputEmbedding(codebook.dim, width, codebook.scales)
        self.image_head = nn.Linear(width, codebook.codebook_size)
        freeze_untied_output_head(lm)

    @property
    def scales(self) -> tuple[int, ...]:
        return self.codebook.scales

    def hidden_states(self, text: TextBatch, scale_inputs: list[torch.Tensor], with_end: bool) -> torch.Tensor:
        """Last hidden states of the text + the image blocks of scales ``0..len(scale_inputs)``."""
        embed = self.lm.get_input_embeddings()
        b, t = text.ids.shape
        start = embed(torch.full((b, self.scales[0] ** 2), self.image_start_id, device=text.ids.device))
        image = self.image_inputs(start, scale_inputs)
        parts = [embed(text.ids), image]
        if with_end:
            parts.append(embed(torch.full((b, 1), self.image_end_id, device=text.ids.device)))
        inputs = torch.cat(parts, dim=1)
        valid = torch.cat([text.mask, torch.ones(b, inputs.shape[1] - t, dtype=torch.bool,
                                                  device=text.mask.device)], dim=1)
        blocks = block_ids(t, self.scales, len(scale_inputs) + 1, with_end).to(inputs.device)
        mask = block_causal_mask(blocks, valid, inputs.dtype)
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        out = self.lm.base_model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                                 use_cache=False)
        return out.last_hidden_state[:, t:]

    def forward(self, text: TextBatch, tokens: torch.Tensor) -> GeneratorOutput:
        """Teacher-forced image-token loss for prompts ``text`` and target tokens [B, L]."""
        inputs = self.codebook.next_scale_inputs(tokens)
        per_scale = list(inputs.split([s * s for s in self.scales[1:]], dim=1))
        hidden = self.hidden_states(text, per_scale, with_end=True)[:, : tokens.shape[1]]
        logits = self.image_head(hidden).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        return GeneratorOutput(loss, logits)

    def scale_logits(self, text: TextBatch, scale_tokens: list[torch.Tensor], scale: int,
                     draft: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, s*s, K] of scale index ``scale`` given the tokens of the scales before it.

        With ``draft`` (tokens of this scale from an earlier sampling round), this scale's inputs
        are built from the features accumulated including the draft (the refinement rounds of
        multi-step sampling).
        """
        inputs = [self.codebook.scale_input(scale_tokens[:j], j) for j in range(1, scale)]
        if scale > 0:
            shown = scale_tokens[:scale] + ([draft] if draft is not None else [])
            inputs.append(self.codebook.scale_input(shown, scale))
        hidden = self.hidden_states(text, inputs, with_end=False)
        size = self.scales[scale] ** 2
        return self.image_head(hidden[:, -size:]).float()
