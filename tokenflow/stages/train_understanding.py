"""The understanding stage: LLaVA-style training on token shards, DeepSpeed ZeRO on Ray Train.

Two Ray Train runs under ``out_url``: ``align/`` (captions, or a row's conversation when it has
none, from the ``align_data`` mixture; the projector, or everything with ``align_trains: all``;
writes ``align/aligned.safetensors``) then ``finetune/`` (everything, conversations of the
``data`` mixture). The tokenizer is frozen: only its codebooks are read. Outputs: the inference
export ``model/`` (``model.safetensors`` + ``text_tokenizer/``) and ``_MANIFEST.json`` (written
last). Running again with the same ``out_url`` resumes whichever phase was interrupted.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.data.examples import conversation_problems
from tokenflow.data.stage_data import StageData
from tokenflow.stages.llm_stage import finish_llm_stage, llm_job_fields, mixture_sources, open_llm_stage
from tokenflow.stages.stage_run import RunLink
from tokenflow.stages.training import fit
from tokenflow.train.jobs import UnderstandingJob

STAGE = "train_understanding"

log = logging.getLogger(__name__)


def run_train_understanding(cfg: TokenFlowConfig, align_data: list[StageData], data: list[StageData],
                            tokenizer_url: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """Align on the mixture ``align_data`` then fine-tune on ``data`` (or resume either); returns
    the stage manifest."""
    from tokenflow.train.understanding_worker import ALIGNED_FILE, train_understanding_worker

    t = cfg.train_understanding
    every = list({d.corpus: d for d in [*align_data, *data]}.values())
    with open_llm_stage(cfg, STAGE, every, tokenizer_url, out_url, link) as run:
        train, table = mixture_sources(run, data)
        align, align_table = mixture_sources(run, align_data, "align/") if t.align_steps else ([], [])
        fields = llm_job_fields(cfg, STAGE, run, data, tokenizer_url, out_url, train, align)
        rows = conversation_problems([u for s in train for u in s.shards], cfg.limits)
        run.metrics({f"finetune_rows/{reason}": float(count) for reason, count in rows.items()})
        if not rows["usable"]:
            raise ValueError(f"no training row has a usable conversation to fine-tune on ({dict(rows)}; "
                             "the reasons are listed in docs/data.md)")
        log.info("fine-tuning rows: %s", dict(rows))
        aligned_url = storage.join(out_url, "align", ALIGNED_FILE) if t.align_steps else None
        if t.align_steps and not storage.exists(aligned_url):  # written atomically, last
            fit(train_understanding_worker,
                UnderstandingJob(**{**fields, "train": align}, phase="align", aligned_url=aligned_url),
                t.model_copy(update={"steps": t.align_steps}), out_url, "align")
        fit(train_understanding_worker, UnderstandingJob(**fields, phase="finetune", aligned_url=aligned_url),
            t, out_url, "finetune")
        phases = {"finetune": (table, "")} | ({"align": (align_table, "align/")} if t.align_steps else {})
        return finish_llm_stage(run, out_url, t.align_steps + t.steps, "understanding", phases)
