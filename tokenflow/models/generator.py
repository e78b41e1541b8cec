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
from transformers import DynamicCache, PreTrainedModel

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
    return block_mask(blocks, blocks, key_valid, dtype)


def block_mask(query_blocks: torch.Tensor, key_blocks: torch.Tensor, key_valid: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """:func:`block_causal_mask` for the last ``n`` of ``T`` positions (a KV-cached step): [B, 1, n, T].
    The queries are the last ``n`` keys; a query sees valid keys of blocks <= its own, and itself."""
    n, t = query_blocks.numel(), key_blocks.numel()
    allowed = key_blocks[None, None, :] <= query_blocks[None, :, None]  # [1, n(query), T(key)]
    allowed = allowed & key_valid[:, None, :]
    keys = torch.arange(t, device=key_blocks.device)
    allowed = allowed | (keys[None, :] == keys[t - n :, None])[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_blocks.device)
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

    def forward(self, blocks: list[torch.Tensor], first: int = 0) -> torch.Tensor:
        """Inputs of scales ``first, first + 1, ...`` -> [B, sum s^2, H]. ``blocks[k]`` holds scale
        ``first + k``'s raw input: the start embeddings [B, s0*s0, H] for scale 0, features
        [B, s*s, D] for later scales."""
        offsets = [0]
        for s in self.scales:
            offsets.append(offsets[-1] + s * s)
        out = []
        for j, block in enumerate(blocks, start=first):
            if j > 0:
                block = self.feature_proj(block.to(self.level.dtype))
            out.append(block + self.level[j] + self.position[offsets[j] : offsets[j + 1]])
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

    def start_embeddings(self, batch: int, device: torch.device) -> torch.Tensor:
        """The ``<boi>`` embedding at every position of scale 0: [B, s0*s0, H]."""
        ids = torch.full((batch, self.scales[0] ** 2), self.image_start_id, device=device)
        return self.lm.get_input_embeddings()(ids)

    def hidden_states(self, text: TextBatch, scale_inputs: list[torch.Tensor], with_end: bool) -> torch.Tensor:
        """Last hidden states of the text + the image blocks of scales ``0..len(scale_inputs)``."""
        embed = self.lm.get_input_embeddings()
        b, t = text.ids.shape
        image = self.image_inputs([self.start_embeddings(b, text.ids.device), *scale_inputs])
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

    def sampling_cache(self, text: TextBatch) -> "ScaleCache":
        """A KV-cached :meth:`scale_logits` for sampling the prompts ``text`` (see :class:`ScaleCache`)."""
        return ScaleCache(self, text)


class ScaleCache:
    """:meth:`NextScaleGenerator.scale_logits` for one batch of prompts, running only the new
    positions: the text and every finished scale block stay in a KV cache.

    Calls follow sampling order. Scale ``i`` without a draft appends its block to the cache (its
    input, from the scales before it, is final: later scales see exactly this block); a call with
    a draft (a refinement round of the latest scale) runs that block against the cache without
    the committed block of the same scale, as the full recomputation would, and is dropped from
    the cache again. Positions, mask and inputs equal :meth:`~NextScaleGenerator.hidden_states`'s,
    so the logits equal the uncached ones up to floating-point rounding.
    """

    def __init__(self, model: NextScaleGenerator, text: TextBatch):
        self.model, self.text = model, text
        self.cache = DynamicCache(config=model.lm.config)
        self.key_blocks = torch.empty(0, dtype=torch.long, device=text.ids.device)
        self.key_valid = torch.empty(text.ids.shape[0], 0, dtype=torch.bool, device=text.ids.device)
        self.scales_cached = 0

    def __call__(self, scale_tokens: list[torch.Tensor], scale: int, draft: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, s*s, K] of scale index ``scale`` (the arguments of ``scale_logits`` but the text)."""
        model, text = self.model, self.text
        b, t = text.ids.shape
        scales = model.scales
        expected = self.scales_cached - 1 if draft is not None else self.scales_cached
        if scale != expected or (scale == 0 and draft is not None):
            raise ValueError(f"scale {scale}{' with a draft' if draft is not None else ''} out of order: "
                             f"{self.scales_cached} scales are cached")
        if scale == 0:
            embed = model.lm.get_input_embeddings()
            inputs = torch.cat([embed(text.ids), model.image_inputs([model.start_embeddings(b, text.ids.device)])], 1)
            blocks = block_ids(t, scales, 1, with_end=False).to(inputs.device)
            valid = torch.cat([text.mask, torch.ones(b, scales[0] ** 2, dtype=torch.bool, device=text.mask.device)], 1)
            positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        else:
            shown = scale_tokens[:scale] + ([draft] if draft is not None else [])
            inputs = model.image_inputs([model.codebook.scale_input(shown, scale)], first=scale)
            size = scales[scale] ** 2
            blocks = torch.full((size,), t + scale, device=inputs.device)
            valid = torch.ones(b, size, dtype=torch.bool, device=text.mask.device)
            before = sum(s * s for s in scales[:scale])
            positions = text.mask.sum(1, keepdim=True) + before + torch.arange(size, device=text.mask.device)
        key_valid = torch.cat([self.key_valid, valid], 1)
        if draft is not None:  # the committed block of this scale is not visible to its redraft
            key_valid = key_valid.clone()
            key_valid[:, -2 * blocks.numel() : -blocks.numel()] = False
        mask = block_mask(blocks, torch.cat([self.key_blocks, blocks]), key_valid, inputs.dtype)
        cached = self.cache.get_seq_length()
        out = model.lm.base_model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                                  past_key_values=self.cache, use_cache=True)
        if self.cache.get_seq_length() != cached + blocks.numel():
            raise RuntimeError(f"{type(model.lm).__name__} did not fill the KV cache (training mode with "
                               "gradient checkpointing turns it off: sample in eval mode)")
        if draft is not None:
            self.cache.crop(-blocks.numel())
        else:
            self.key_blocks, self.key_valid = torch.cat([self.key_blocks, blocks]), key_valid
            self.scales_cached += 1
        return model.image_head(out.last_hidden_state[:, -scales[scale] ** 2 :]).float()
