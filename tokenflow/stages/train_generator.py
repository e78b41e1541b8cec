"""The text-to-image stage: next-scale prediction in a causal LM, DeepSpeed ZeRO on Ray Train.

Reads token shards (never the images) of every corpus of its mixture (``train_generator.data``):
``pretokenize_generation.<c>``'s when ``train_generator.tokenizer_view`` is set (checked against
the shards' manifests), else ``pretokenize.<c>``'s; and the tokenizer export that made them (its codebooks give the
teacher-forcing features and, at the view, decode the samples). Outputs under
``out_url``: Ray Train's run directory ``train/`` (checkpoints), the inference export ``model/``
(``model.safetensors`` + ``text_tokenizer/``) and ``_MANIFEST.json`` (written last). Running it
again with the same ``out_url`` resumes from the latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

from typing import Any

from tokenflow.config import TokenFlowConfig
from tokenflow.data.stage_data import StageData
from tokenflow.stages.llm_stage import finish_llm_stage, llm_job_fields, mixture_sources, open_llm_stage, unigram_entropy
from tokenflow.stages.stage_run import RunLink
from tokenflow.stages.training import fit
from tokenflow.train.jobs import GeneratorJob

STAGE = "train_generator"
TRAIN_RUN_NAME = "train"


def run_train_generator(cfg: TokenFlowConfig, data: list[StageData], tokenizer_url: str, out_url: str,
                        link: RunLink | None = None) -> dict[str, Any]:
    """Train (or resume training) the generator on the mixture ``data``; returns the stage manifest."""
    from tokenflow.train.generator_worker import train_generator_worker

    t = cfg.train_generator
    with open_llm_stage(cfg, STAGE, data, tokenizer_url, out_url, link, cfg.generation_view) as run:
        train, table = mixture_sources(run, data)
        fields = llm_job_fields(cfg, STAGE, run, data, tokenizer_url, out_url, train)
        job = GeneratorJob(**fields, unigram_entropy=unigram_entropy(train, data[0].manifest["codebook_size"]))
        fit(train_generator_worker, job, t, out_url, TRAIN_RUN_NAME)
        return finish_llm_stage(run, out_url, t.steps, "generator", {"train": (table, "")})
