"""The text-to-image stage: next-scale prediction in a causal LM, DeepSpeed ZeRO on Ray Train.

Reads the token shards of ``pretokenize`` (never the images) and the tokenizer export that made
them (its codebooks give the teacher-forcing features and decode the samples). Outputs under
``out_url``: Ray Train's run directory ``train/`` (checkpoints), the inference export ``model/``
(``model.safetensors`` + ``text_tokenizer/``) and ``_MANIFEST.json`` (written last). Running it
again with the same ``out_url`` resumes from the latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

from typing import Any

from tokenflow import storage
from tokenflow.config import ConfigError, TokenFlowConfig
from tokenflow.data.manifest import manifest_digest
from tokenflow.models.llm_weights import TEXT_TOKENIZER_DIR
from tokenflow.stages.llm_stage import (check_tokenizer, finish_llm_stage, prepare_text_tokenizer,
                                       token_shard_urls, unigram_entropy)
from tokenflow.stages.training import fit, resolve_use_gpu
from tokenflow.workflow.tracking import start_stage_run

STAGE = "train_generator"
TRAIN_RUN_NAME = "train"
EXPORT_DIR = "model"


def run_train_generator(cfg: TokenFlowConfig, token_manifest: dict[str, Any], token_url: str,
                        tokenizer_url: str, out_url: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Train (or resume training) the generator; returns the stage manifest."""
    from tokenflow.train.generator_worker import train_generator_worker

    t = cfg.train_generator
    if t is None:
        raise ConfigError("the config has no train_generator section")
    tokenizer_digest = check_tokenizer(token_manifest, tokenizer_url)
    inputs = {"token_manifest": manifest_digest(token_manifest), "tokenizer": tokenizer_digest}
    tracking_uri, run_id, params = start_stage_run(cfg, STAGE, {"train_generator"}, out_url, inputs, parent_run_id)
    train_urls = token_shard_urls(token_manifest, token_url, "train")
    export_dir = storage.join(out_url, EXPORT_DIR)
    text_tokenizer_url = storage.join(export_dir, TEXT_TOKENIZER_DIR)
    prepare_text_tokenizer(t.language_model, train_urls, text_tokenizer_url)
    job = {
        "config": cfg.model_dump(mode="json"),
        "train_urls": train_urls,
        "heldout_urls": token_shard_urls(token_manifest, token_url, "heldout"),
        "tokenizer_url": tokenizer_url,
        "text_tokenizer_url": text_tokenizer_url,
        "unigram_entropy": unigram_entropy(train_urls, token_manifest["codebook_size"]),
        "use_gpu": resolve_use_gpu(t.use_gpu),
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "export_dir": export_dir,
    }
    fit(train_generator_worker, job, t, out_url, TRAIN_RUN_NAME)
    return finish_llm_stage(run_id, out_url, EXPORT_DIR, t.steps, params["config_hash"], inputs, "generator")
