"""The understanding stage: LLaVA-style training on token shards, DeepSpeed ZeRO on Ray Train.

Two Ray Train runs under ``out_url``: ``align/`` (captions; the projector, or everything with
``align_trains: all``; writes ``align/aligned.safetensors``) then ``finetune/`` (everything,
conversations). The tokenizer is frozen: only its codebooks are read. Outputs: the inference
export ``model/`` (``model.safetensors`` + ``text_tokenizer/``) and ``_MANIFEST.json`` (written
last). Running again with the same ``out_url`` resumes whichever phase was interrupted.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenflow import storage
from tokenflow.config import TokenFlowConfig
from tokenflow.data.examples import conversation_problems
from tokenflow.stages.llm_stage import finish_llm_stage, llm_job_fields, open_llm_stage
from tokenflow.stages.stage_run import RunLink
from tokenflow.stages.training import fit
from tokenflow.train.jobs import UnderstandingJob

STAGE = "train_understanding"

log = logging.getLogger(__name__)


def run_train_understanding(cfg: TokenFlowConfig, token_manifest: dict[str, Any], token_url: str,
                            tokenizer_url: str, out_url: str, link: RunLink | None = None) -> dict[str, Any]:
    """Align then fine-tune (or resume either); returns the stage manifest."""
    from tokenflow.train.understanding_worker import ALIGNED_FILE, train_understanding_worker

    t = cfg.train_understanding
    with open_llm_stage(cfg, STAGE, token_manifest, token_url, tokenizer_url, out_url, link) as run:
        fields = llm_job_fields(cfg, STAGE, run, token_manifest, token_url, tokenizer_url, out_url)
        rows = conversation_problems(fields["train_urls"], cfg.limits)
        run.metrics({f"finetune_rows/{reason}": float(count) for reason, count in rows.items()})
        if not rows["usable"]:
            raise ValueError(f"no training row has a usable conversation to fine-tune on ({dict(rows)}; "
                             "the reasons are listed in docs/data.md)")
        log.info("fine-tuning rows: %s", dict(rows))
        aligned_url = storage.join(out_url, "align", ALIGNED_FILE) if t.align_steps else None
        if t.align_steps and not storage.exists(aligned_url):  # written atomically, last
            fit(train_understanding_worker, UnderstandingJob(**fields, phase="align", aligned_url=aligned_url),
                t.model_copy(update={"steps": t.align_steps}), out_url, "align")
        fit(train_understanding_worker, UnderstandingJob(**fields, phase="finetune", aligned_url=aligned_url),
            t, out_url, "finetune")
        return finish_llm_stage(run, out_url, t.align_steps + t.steps, "understanding")
