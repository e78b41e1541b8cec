"""Integration fixtures: a real local Ray instance and a small tokenizer checkpoint."""

from __future__ import annotations

import os
import time

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def assert_resources_released(ray, within_s: float = 10.0) -> None:
    """A stage's actors are gone soon after it returns: the next stage can have every CPU."""
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"a finished stage still holds CPUs: {ray.available_resources()}"
        time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_local(s3_store):
    """Ray for the session, started after the S3 server so its workers inherit the endpoint."""
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


@pytest.fixture(scope="session")
def token_shards(ray_local, tmp_path_factory, tiny_tokenizer_path):
    """A small shapes corpus pre-tokenized by the tiny tokenizer: (manifest, shards URL)."""
    from tokenflow.config import PretokenizeConfig
    from tokenflow.data.manifest import corpus_manifest, index_shard
    from tokenflow.data.shapes import write_shapes_corpus
    from tokenflow.stages.pretokenize import pretokenize_corpus

    root = tmp_path_factory.mktemp("llm-data")
    splits = write_shapes_corpus(str(root / "corpus"), num_samples=120, shard_size=30, seed=0,
                                 heldout_fraction=0.2)
    manifest = corpus_manifest({name: [index_shard(u) for u in urls] for name, urls in splits.items()},
                               {"kind": "shapes"})
    out = str(root / "tokens")
    tokens = pretokenize_corpus(manifest, str(tiny_tokenizer_path), out,
                             PretokenizeConfig(batch_size=32, micro_batch=16, num_actors=1))
    assert_resources_released(ray_local)  # the training tests after it need every CPU
    return tokens, out
