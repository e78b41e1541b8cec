"""Next-scale sampling with classifier-free guidance and multi-round top-k/top-p refinement.

For scale index i of n, guidance is ``t = cfg_scale * i / (n - 1)`` (a linear ramp: none at the
first scale) and the logits used are ``(1 + t) * cond - t * uncond``. Each scale after the first
is sampled in ``len(top_k)`` rounds, as in the reference sampler: round 0 samples from the
scale's logits; round r > 0 recomputes them with the previous round's draft of this scale
shown to the model, filters with ``(top_k[r], top_p[r])`` and replaces the draft. The defaults
``[1200, 100, 1]`` / ``[0.8, 0.8, 0]`` end with a greedy round. The first scale uses round 0 only.

The conditional and unconditional rows run as one batch, through the model's KV cache by
default (each scale and round computes only its new positions); ``use_cache=False`` recomputes
the whole prefix every time, as the reference sampler does. Rows may carry their own random
generators, so a prompt's images do not depend on the prompts batched with it.
"""

from __future__ import annotations

from itertools import groupby
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

from tokenflow.config import SamplingConfig
from tokenflow.models.generator import TextBatch


ScaleLogits = Callable[[list[torch.Tensor], int, "torch.Tensor | None"], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


class ScaleModel(Protocol):
    scales: tuple[int, ...]

    def scale_logits(self, text: TextBatch, scale_tokens: list[torch.Tensor], scale: int,
                     draft: torch.Tensor | None = None) -> torch.Tensor: ...

    def sampling_cache(self, text: TextBatch) -> ScaleLogits: ...


def guidance(scale: int, num_scales: int, cfg_scale: float) -> float:
    """The CFG weight of scale index ``scale``: linear from 0 at the first scale to ``cfg_scale``."""
    return cfg_scale * scale / max(num_scales - 1, 1)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    return (1.0 + weight) * cond - weight * uncond


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with -inf outside the ``top_k`` most likely tokens and outside the smallest set of
    most likely tokens whose probability reaches ``top_p``; 0 turns either filter off."""
    out = logits.clone()
    if top_k > 0:
        kth = out.topk(min(top_k, out.shape[-1]), dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = out.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_from(logits: torch.Tensor, top_k: int, top_p: float, temperature: float,
                generator: Generators) -> torch.Tensor:
    """One draw per position from filtered logits [B, ..., K] -> indices [B, ...]. ``generator``:
    one for every row, or one per row (consecutive rows sharing a generator draw together).

    With ``top_k`` the draw is among the ``top_k`` most likely tokens only (exactly ``top_k``:
    ties at the boundary go to the lower index), so nucleus filtering and the draw work on
    ``top_k`` candidates instead of the whole codebook."""
    scaled = logits / temperature
    candidates = None
    if 0 < top_k < logits.shape[-1]:
        scaled, candidates = scaled.topk(top_k, dim=-1)
    probs = filter_logits(scaled, 0, top_p).softmax(dim=-1)
    draws = _multinomial(probs, generator)
    return draws if candidates is None else candidates.gather(-1, draws[..., None])[..., 0]


def _multinomial(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One index per row of ``probs`` [B, ..., C] -> [B, ...], drawn with the row's generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).view(probs.shape[:-1])
    if len(generator) != probs.shape[0]:
        raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows")
    out, start = [], 0
    for _, rows in groupby(generator, key=id):
        n = len(list(rows))
        out.append(_multinomial(probs[start : start + n], generator[start]))
        start += n
    return torch.cat(out)


def _with_unconditional(text: TextBatch, negative: TextBatch) -> TextBatch:
    """Prompts followed by as many copies of the negative prompt (one batch of 2B)."""
    width = max(text.ids.shape[1], negative.ids.shape[1])

    def widen(batch: TextBatch) -> TextBatch:
        pad = width - batch.ids.shape[1]
        return TextBatch(F.pad(batch.ids, (pad, 0)), F.pad(batch.mask, (pad, 0)))

    t, e = widen(text), widen(negative)
    b = text.ids.shape[0]
    return TextBatch(torch.cat([t.ids, e.ids.expand(b, -1)]), torch.cat([t.mask, e.mask.expand(b, -1)]))


@torch.no_grad()
def sample_tokens(model: ScaleModel, text: TextBatch, negative: TextBatch, cfg: SamplingConfig,
                  generator: Generators = None, use_cache: bool = True) -> torch.Tensor:
    """Sample image tokens [B, sum s^2] for prompts ``text``; ``negative`` is the one-row prompt of
    the unconditional branch (the empty prompt, or ``cfg.negative_prompt`` tokenized)."""
    b = text.ids.shape[0]
    both = _with_unconditional(text, negative)
    if use_cache:
        logits_of = model.sampling_cache(both)
    else:
        def logits_of(shown: list[torch.Tensor], scale: int, draft: torch.Tensor | None) -> torch.Tensor:
            return model.scale_logits(both, shown, scale, draft)
    n = len(model.scales)
    scale_tokens: list[torch.Tensor] = []
    for i in range(n):
        weight = guidance(i, n, cfg.cfg_scale)
        rounds = len(cfg.top_k) if i > 0 else 1
        draft = None
        for r in range(rounds):
            shown = [torch.cat([t, t]) for t in scale_tokens]
            logits = logits_of(shown, i, None if draft is None else torch.cat([draft, draft]))
            guided = guided_logits(logits[:b], logits[b:], weight)
            draft = sample_from(guided, cfg.top_k[r], cfg.top_p[r], cfg.temperature, generator)
        scale_tokens.append(draft)
    return torch.cat(scale_tokens, dim=1)
