"""Integration fixtures: a real local Ray instance and a small tokenizer checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
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


class ProcessKiller(threading.Thread):
    """SIGKILLs the newest process whose command line contains ``marker`` once ``ready()`` holds
    (polled; gives up after ``timeout_s``). ``killed``: the pid."""

    def __init__(self, marker: str, ready: Callable[[], bool], timeout_s: float = 300.0):
        super().__init__(daemon=True)
        self.marker, self.ready, self.timeout_s = marker, ready, timeout_s
        self.killed: int | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        matches = [p for p in psutil.process_iter(["pid", "cmdline"])
                   if any(self.marker in part for part in p.info["cmdline"] or [])]
        if matches:
            self.killed = max(p.info["pid"] for p in matches)
            os.kill(self.killed, signal.SIGKILL)


def worker_killer(checkpoints: Path, run: str = "train") -> ProcessKiller:
    """Kills one Ray Train worker once Ray Train has registered a checkpoint of the stage's run
    ``run`` (its checkpoint manager's snapshot under ``checkpoints/<run>`` names one), so the
    restarted group must resume from a checkpoint."""
    snapshot = checkpoints / run / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return False

    return ProcessKiller("RayTrainWorker", registered)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh storage root on local disk, then on the session's S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_url")


RUNTIME_ENV = {"env_vars": {"DS_ACCELERATOR": "cpu"}}


def start_local_ray():
    """The session's single-node Ray (2 CPUs) in this process."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=RUNTIME_ENV)
    return ray


@pytest.fixture(scope="session")
def ray_local(s3_store):
    """Ray for the session, started after the S3 server so its workers inherit the endpoint."""
    ray = start_local_ray()
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


def shapes_corpus(root: Path, **shapes) -> dict:
    """A shapes corpus written under ``root`` (``write_shapes_corpus`` arguments): its manifest."""
    from tokenflow.data.manifest import corpus_manifest, index_shard
    from tokenflow.data.shapes import write_shapes_corpus

    splits = write_shapes_corpus(str(root), **shapes)
    return corpus_manifest({name: [index_shard(u) for u in urls] for name, urls in splits.items()},
                           {"kind": "shapes"})


@pytest.fixture(scope="session")
def token_corpus(tmp_path_factory) -> dict:
    """A small shapes corpus (120 images, 5 shards): its manifest."""
    return shapes_corpus(tmp_path_factory.mktemp("llm-corpus"), num_samples=120, shard_size=30, seed=0,
                         heldout_fraction=0.2)


@pytest.fixture(scope="session")
def token_shards(ray_local, tmp_path_factory, tiny_tokenizer_path, token_corpus):
    """``token_corpus`` pre-tokenized by the tiny tokenizer on one node: (manifest, shards URL)."""
    from tokenflow.config import PretokenizeConfig
    from tokenflow.stages.pretokenize import pretokenize_corpus

    out = str(tmp_path_factory.mktemp("llm-tokens"))
    tokens = pretokenize_corpus(token_corpus, str(tiny_tokenizer_path), out,
                                PretokenizeConfig(batch_size=32, micro_batch=16, num_actors=1))
    assert_resources_released(ray_local)  # the training tests after it need every CPU
    return tokens, out
