"""The MLflow Model Registry: where a completed model stage publishes its export, and how a
team loads a registered version back by alias instead of copying paths.

A version's source is the export's durable storage URL (nothing is copied into MLflow); its tags
carry the stage, stage hash, config hash, git commit, input digests and the export's sha256,
which :func:`load_registered` checks before loading. The pipeline moves the configured alias
(``candidate``) to every version it registers; promotion moves another alias (for example
``champion``) by hand or by a review job.
"""

from __future__ import annotations

from typing import Any

from tokenflow import storage
from tokenflow.data.manifest import file_digest
from tokenflow.redaction import redact

# What each model stage exports: the file whose sha256 identifies the version.
EXPORT_KINDS = {"train_tokenizer": "tokenizer", "finetune_decoder": "tokenizer",
                "train_generator": "generator", "train_understanding": "understanding"}


class RegistryError(RuntimeError):
    """A registered version is missing, or its export no longer matches it."""


def register_export(client: Any, name: str, alias: str, stage: str, run_id: str, source_url: str,
                    weights_path: str, sha256: str, tags: dict[str, str]) -> str:
    """Register the export at ``source_url`` (its weights file at ``weights_path`` inside it, ""
    when the export is that file; sha256 ``sha256``) as a version of ``name`` linked to
    ``run_id`` and move ``alias`` to it; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"TokenFlow {EXPORT_KINDS[stage]} exports of the "
                                                         f"{stage} stage, registered by the pipeline.")
    for existing in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if existing.tags.get("tokenflow.export_sha256") == sha256:  # a resumed stage registered it already
            client.set_registered_model_alias(name, alias, existing.version)
            return str(existing.version)
    version_tags = {**tags, "tokenflow.stage": stage, "tokenflow.kind": EXPORT_KINDS[stage],
                    "tokenflow.export_sha256": sha256, "tokenflow.weights_path": weights_path}
    version = client.create_model_version(name, redact(source_url), run_id=run_id,
                                          tags={k: redact(v) for k, v in version_tags.items()},
                                          description=f"{stage} export of run {run_id}")
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def registered_export(name: str, ref: str | int, tracking_uri: str | None = None) -> tuple[str, str]:
    """``(kind, source URL)`` of version or alias ``ref`` of ``name``, after checking that the
    export still has the sha256 it was registered with."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    ref = str(ref)
    version = client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
    tags = version.tags
    weights_url = storage.join(version.source, tags["tokenflow.weights_path"]) if tags.get("tokenflow.weights_path") \
        else version.source
    found = file_digest(weights_url)[1]
    if found != tags.get("tokenflow.export_sha256"):
        raise RegistryError(f"{name} version {version.version}: {weights_url} has sha256 {found[:12]}, "
                            f"registered {tags.get('tokenflow.export_sha256', '?')[:12]}")
    return tags["tokenflow.kind"], version.source


def load_registered(name: str, ref: str | int = "candidate", tracking_uri: str | None = None) -> Any:
    """The model of a registered version: a tokenizer, or ``(model, text tokenizer)`` for the
    generator and understanding models, loaded by the project's own loaders."""
    from tokenflow.models.llm_weights import load_generator, load_understanding
    from tokenflow.models.weights import load_tokenizer

    kind, source = registered_export(name, ref, tracking_uri)
    if kind == "tokenizer":
        return load_tokenizer(storage.local_path(source))
    return {"generator": load_generator, "understanding": load_understanding}[kind](source)

