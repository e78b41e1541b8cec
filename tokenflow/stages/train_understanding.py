"""The understanding stage: LLaVA-style training on token shards, DeepSpeed ZeRO on Ray Train.

Two Ray Train runs under ``out_url``: ``align/`` (projector only, captions; writes
``align/projector.safetensors``) then ``finetune/`` (everything, conversations). The tokenizer
is frozen: only its codebooks are read. Outputs: the inference export ``model/``
(``model.safetensors`` + ``text_tokenizer/``) and ``_MANIFEST.json`` (written last). Running
again with the same ``out_url`` resumes whichever phase was interrupted.
"""

from __future__ import annotations

from typing import Any

from tokenflow import storage
from tokenflow.config import ConfigError, TokenFlowConfig
from tokenflow.data.manifest import manifest_digest
from tokenflow.models.llm_weights import TEXT_TOKENIZER_DIR
from tokenflow.stages.llm_stage import check_tokenizer, finish_llm_stage, prepare_text_tokenizer, token_shard_urls
from tokenflow.stages.training import fit, resolve_use_gpu
from tokenflow.workflow.tracking import start_stage_run

STAGE = "train_understanding"
EXPORT_DIR = "model"


def run_train_understanding(cfg: TokenFlowConfig, token_manifest: dict[str, Any], token_url: str,
                            tokenizer_url: str, out_url: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Align then fine-tune (or resume either); returns the stage manifest."""
    from tokenflow.train.understanding_worker import PROJECTOR_FILE, train_understanding_worker

    t = cfg.train_understanding
    if t is None:
        raise ConfigError("the config has no train_understanding section")
    tokenizer_digest = check_tokenizer(token_manifest, tokenizer_url)
    inputs = {"token_manifest": manifest_digest(token_manifest), "tokenizer": tokenizer_digest}
    tracking_uri, run_id, params = start_stage_run(cfg, STAGE, {"train_understanding"}, out_url, inputs,
                                                   parent_run_id)
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
        "use_gpu": resolve_use_gpu(t.use_gpu),
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "export_dir": export_dir,
        "projector_url": storage.join(out_url, "align", PROJECTOR_FILE) if t.align_steps else None,
    }
    if t.align_steps and not storage.exists(job["projector_url"]):  # written atomically, last
        fit(train_understanding_worker, {**job, "phase": "align"}, t.model_copy(update={"steps": t.align_steps}),
            out_url, "align")
    fit(train_understanding_worker, {**job, "phase": "finetune"}, t, out_url, "finetune")
    return finish_llm_stage(run_id, out_url, EXPORT_DIR, t.align_steps + t.steps, params["config_hash"], inputs,
                            "understanding")
