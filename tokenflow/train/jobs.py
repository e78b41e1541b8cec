"""The typed jobs stage drivers hand to their Ray Train workers (one per worker loop)."""

from __future__ import annotations

from dataclasses import dataclass

from tokenflow.config import TokenFlowConfig
from tokenflow.data.manifest import ShardRecord
from tokenflow.train.mixture import MixtureSource, TokenSource


@dataclass(frozen=True)
class WorkerJob:
    """What every training worker reads: the validated config, its device and the stage's run."""

    config: TokenFlowConfig
    use_gpu: bool
    tracking_uri: str | None  # None: no MLflow logging
    mlflow_run_id: str | None


@dataclass(frozen=True)
class TokenizerJob(WorkerJob):
    """``train_tokenizer``, or the decoder-only ``finetune_decoder`` of the export at ``init_url``."""

    section: str  # "train_tokenizer" | "finetune_decoder"
    train: list[MixtureSource[ShardRecord]]  # the corpora's training shards, mixed by weight
    heldout: list[MixtureSource[ShardRecord]]  # the corpora's held-out shards (held-out images by weight)
    export_url: str
    quarantine_url: str
    init_url: str | None = None

    @property
    def decoder_only(self) -> bool:
        return self.section == "finetune_decoder"


@dataclass(frozen=True)
class LLMJob(WorkerJob):
    """What both LLM stages' workers read: token shards, the tokenizer export that made them (at
    the shards' scales), the stage's text tokenizer and where the export goes."""

    train: list[TokenSource]  # the corpora's training token shards, mixed by weight
    heldout: list[TokenSource]  # the corpora's held-out token shards (held-out examples by weight)
    tokenizer_url: str
    token_scales: list[int]
    text_tokenizer_url: str
    export_dir: str


@dataclass(frozen=True)
class GeneratorJob(LLMJob):
    unigram_entropy: float  # nats: the held-out loss of a model that ignores every input


@dataclass(frozen=True)
class UnderstandingJob(LLMJob):
    phase: str  # "align" | "finetune"
    aligned_url: str | None  # align's export (None: no align phase)
