"""LLaVA-style image understanding on TokenFlow tokens.

The tokens' accumulated codebook features (40-d per position of the last grid: semantic then
pixel, from the frozen tokenizer codebooks) go through a 2-layer GELU MLP into the LM's
embedding space. Sequence: ``<s>``, the g*g image positions, then the prompt and the answer;
the loss covers the answer and its ``</s>`` only. Batches are right-padded.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenflow.models.language_model import hidden_size
from tokenflow.models.quantizer import CodebookFeatures
from tokenflow.models.text import chat_answer, chat_prompt, encode_text

IGNORE = -100


class ChatBatch(NamedTuple):
    """Right-padded text after the image: ids, validity mask, labels (IGNORE off the answer)."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor


def chat_batch(tok: PreTrainedTokenizerBase, conversations: Sequence[Sequence[tuple[str, str]]],
               max_tokens: int) -> ChatBatch:
    """Tokenize conversations of (question, answer) turns: each turn's prompt ids (unsupervised),
    then its answer ids and EOS (supervised)."""
    rows = []
    for turns in conversations:
        ids: list[int] = []
        labels: list[int] = []
        for question, answer in turns:
            prompt, _ = encode_text(tok, chat_prompt(question), max_tokens)
            target, _ = encode_text(tok, chat_answer(answer), max_tokens)
            target = target + [tok.eos_token_id]
            ids += prompt + target
            labels += [IGNORE] * len(prompt) + target
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = True
    return ChatBatch(ids, mask, labels)


class UnderstandingModel(nn.Module):
    """Projector + causal LM reading TokenFlow tokens."""

    def __init__(self, lm: PreTrainedModel, codebook: CodebookFeatures, bos_id: int):
        super().__init__()
        self.lm = lm
        self.codebook = codebook
        self.bos_id = bos_id
        width = hidden_size(lm)
        self.projector = nn.Sequential(nn.Linear(codebook.dim, width), nn.GELU(), nn.Linear(width, width))

    def _prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """``<s>`` and the projected image features, [B, 1 + g*g, H]."""
        embed = self.lm.get_input_embeddings()
        bos = embed(torch.full((tokens.shape[0], 1), self.bos_id, device=tokens.device))
        features = self.codebook.tokens_to_features(tokens).flatten(2).transpose(1, 2)
        return torch.cat([bos, self.projector(features.to(bos.dtype))], dim=1)

    def forward(self, tokens: torch.Tensor, chat: ChatBatch) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens (the LM shifts labels itself)."""
        prefix = self._prefix(tokens)
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(chat.ids)], dim=1)
        n = prefix.shape[1]
        mask = torch.cat([torch.ones(tokens.shape[0], n, dtype=torch.long, device=tokens.device),
                          chat.mask.long()], dim=1)
        labels = torch.cat([torch.full((tokens.shape[0], n), IGNORE, device=tokens.device), chat.labels], dim=1)
        return self.lm(inputs_embeds=inputs, attention_mask=mask, labels=labels, use_cache=False).loss

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, questions: list[str], tok: PreTrainedTokenizerBase,
                 max_new_tokens: int = 8, max_tokens: int = 64, synced_ranks: bool = False) -> list[str]:
        """Greedy answers to one question per image (prompts left-padded for batched decoding).

        ``synced_ranks``: every rank keeps stepping until ``max_new_tokens`` (ZeRO-3 gathers
        parameters collectively, so ranks must run the same number of forwards)."""
        prompts = [encode_text(tok, chat_prompt(q), max_tokens)[0] for q in questions]
        width = max(len(p) for p in prompts)
        embed = self.lm.get_input_embeddings()
        prefix = self._prefix(tokens)
        rows, masks = [], []
        for i, p in enumerate(prompts):
            pad = width - len(p)  # left padding goes before the image, so all rows end together
            ids = torch.tensor([tok.pad_token_id] * pad + p, dtype=torch.long, device=tokens.device)
            text = embed(ids)
            rows.append(torch.cat([text[:pad], prefix[i], text[pad:]]))
            masks.append(torch.tensor([0] * pad + [1] * (prefix.shape[1] + len(p)), device=tokens.device))
        inputs, mask = torch.stack(rows), torch.stack(masks)
        out = self.lm.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               synced_gpus=synced_ranks)
        return [tok.decode(row, skip_special_tokens=True).strip() for row in out]
