"""The Model Registry: a model stage registers its export with its lineage and the alias; a team
loads a version back by alias through the project's loader, and a changed export is refused."""

from __future__ import annotations

import mlflow
import pytest
import torch

from tokenflow.config import load_config
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.weights import file_sha256, save_tokenizer
from tokenflow.stages.registry import RegistryError, load_registered
from tokenflow.stages.stage_run import RunLink, StageIdentity, StageRun

from tests.conftest import REPO

SMOKE = REPO / "configs" / "pipelines" / "smoke.yaml"


@pytest.fixture
def cfg(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return load_config(SMOKE)


def _register(cfg, out, link=RunLink()) -> StageRun:
    export = out / "tokenizer.safetensors"
    with StageRun(cfg, "train_tokenizer", {"train_tokenizer"}, str(out), {"corpus_manifest": "c" * 64}, link) as run:
        run.register_model(str(export), "", file_sha256(export))
        run.finish({"kind": "tokenizer"})
    return run


def test_a_registered_tokenizer_loads_back_by_alias_with_its_lineage(cfg, tiny_config, tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "train_tokenizer" / "abc"
    out.mkdir(parents=True)
    model = TokenFlowTokenizer(tiny_config, with_teacher=False)
    save_tokenizer(model, out / "tokenizer.safetensors")
    identity = StageIdentity(hash="ab" * 32, config={}, inputs={}, code="ef" * 32, modules=(), deepspeed=None,
                             libraries={}, device="cpu")
    run = _register(cfg, out, RunLink(None, identity, {}, "smoke"))

    client = mlflow.MlflowClient(run.tracking_uri)
    name = cfg.tracking.registered_models["train_tokenizer"]
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.run_id == run.run_id and version.source == str(out / "tokenizer.safetensors")
    assert version.tags["tokenflow.stage_hash"] == "ab" * 32
    assert version.tags["tokenflow.config_hash"] == client.get_run(run.run_id).data.tags["tokenflow.config_hash"]
    assert "corpus_manifest" in version.tags["tokenflow.input_digests"] and version.tags["tokenflow.git_commit"]
    assert client.get_run(run.run_id).data.tags["tokenflow.registered_model"] == f"{name}/{version.version}"

    loaded = load_registered(name, "candidate", run.tracking_uri)
    for key, value in model.state_dict().items():
        if key in loaded.state_dict():
            assert torch.equal(loaded.state_dict()[key], value), key

    (out / "tokenizer.safetensors").write_bytes(b"replaced")  # the export changed after registration
    with pytest.raises(RegistryError, match="sha256"):
        load_registered(name, version.version, run.tracking_uri)


def test_registering_nothing_when_no_name_is_configured(cfg, tmp_path):
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"registered_models": {}})})
    (tmp_path / "tokenizer.safetensors").write_bytes(b"w")
    run = _register(cfg, tmp_path)
    assert "tokenflow.registered_model" not in mlflow.MlflowClient(run.tracking_uri).get_run(run.run_id).data.tags
