"""What the two LLM workers share: frozen codebooks, the text tokenizer, example streams over
token shards, the optimizer/engine, and the inference export."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tokenflow import storage
from tokenflow.config import TrainGeneratorConfig, TrainingConfig, TrainUnderstandingConfig
from tokenflow.data.token_shards import TokenSample, iter_token_samples
from tokenflow.models.language_model import build_language_model
from tokenflow.models.llm_weights import load_text_tokenizer_dir, save_llm
from tokenflow.models.quantizer import CodebookFeatures
from tokenflow.train.engines import deepspeed_config, make_engine
from tokenflow.train.harness import gathered_state_dict
from tokenflow.train.jobs import LLMJob
from tokenflow.train.mixture import MixtureStream, TokenSource, mixture_stream, shares_of

E = TypeVar("E")


def load_codebook(tokenizer_url: str, scales: list[int]) -> CodebookFeatures:
    """The frozen code vectors of a trained tokenizer export, over the token shards' scales
    (the tokenizer's own, or those of the view the shards were made at)."""
    from tokenflow.models.weights import load_tokenizer

    return CodebookFeatures.from_quantizer(load_tokenizer(storage.local_path(tokenizer_url)).quantizer,
                                           tuple(scales))


def load_llm_parts(job: LLMJob, t: TrainGeneratorConfig | TrainUnderstandingConfig
                   ) -> tuple[PreTrainedTokenizerBase, CodebookFeatures, PreTrainedModel]:
    """The stage's text tokenizer, the frozen codebooks and the LM, built from ``t.seed`` so every
    rank (and every phase of a stage) starts from identical weights."""
    tok = load_text_tokenizer_dir(job.text_tokenizer_url)
    codebook = load_codebook(job.tokenizer_url, job.token_scales)
    torch.manual_seed(t.seed)
    return tok, codebook, build_language_model(t.language_model, len(tok))


def example_stream(sources: list[TokenSource], expand: Callable[[TokenSample], list[E]], rank: int, world: int,
                   seed: int) -> MixtureStream[E]:
    """A resumable rank-sharded stream of the examples ``expand`` makes from each row of the
    mixture ``sources`` (rows deduplication dropped left out)."""
    return mixture_stream(sources, lambda url: iter_token_samples([url]), expand, rank, world, seed)


def heldout_examples(sources: list[TokenSource], expand: Callable[[TokenSample], list[E]], count: int) -> list[E]:
    """The first examples of each corpus's held-out shards, ``count`` split by weight (the same on
    every rank)."""
    return [e for source, n in zip(sources, shares_of(count, sources)) for e in first_examples(source.shards, expand, n)]


def first_examples(urls: list[str], expand: Callable[[TokenSample], list[E]], count: int) -> list[E]:
    """The first ``count`` examples of the given shards, in order (the same on every rank)."""
    out: list[E] = []
    for sample in iter_token_samples(urls):
        out.extend(expand(sample))
        if len(out) >= count:
            return out[:count]
    return out


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on matrices and embedding tables, none on biases and norm
    gains (the vectors), as the reference's trainers exclude bias and LayerNorm/RMSNorm weights."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def engine_for(model: nn.Module, t: TrainingConfig, params: list[nn.Parameter], lr: float, total_steps: int):
    """A DeepSpeed engine with AdamW over the trainable ``params`` at ``lr`` (:func:`decay_groups`)
    and the stage's learning-rate schedule over ``total_steps``."""
    optimizer = torch.optim.AdamW(decay_groups(params, t.weight_decay), lr=lr, betas=t.betas)
    return make_engine(model, optimizer, deepspeed_config(t.deepspeed, t.micro_batch_size, t.grad_accum,
                                                          t.grad_clip), t.lr_schedule, total_steps)


def export_llm(model: nn.Module, engine: Any, rank: int, lm: PreTrainedModel, meta: dict[str, Any],
               url: str, keep: tuple[str, ...] = ()) -> None:
    """Gather (ZeRO-3 safe) and write the weights (only names starting with ``keep`` when given)
    to ``url`` from rank 0."""
    state = gathered_state_dict(model, engine, rank)
    if rank == 0:
        if keep:
            state = {k: v for k, v in state.items() if k.startswith(keep)}
        save_llm(state, {**meta, "lm_config": lm.config.to_dict()}, url)


def special_id(tok: PreTrainedTokenizerBase, token: str) -> int:
    ids = tok.convert_tokens_to_ids(token)
    if ids is None or ids == tok.unk_token_id:
        raise ValueError(f"text tokenizer lacks the special token {token!r}")
    return int(ids)
