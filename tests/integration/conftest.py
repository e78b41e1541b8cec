"""Integration fixtures: a real local Ray instance and a small tokenizer checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory, tiny_config):
    """An (untrained, seeded) tiny tokenizer saved as the inference export."""
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.models.weights import save_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.safetensors"
    save_tokenizer(TokenFlowTokenizer(tiny_config, with_teacher=False), path)
    return path
