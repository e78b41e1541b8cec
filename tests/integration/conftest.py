"""Integration fixtures: a real local Ray instance, a small tokenizer checkpoint, and the evaluation
stages' inputs (a shapes corpus, tiny LLM exports, their config)."""

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


# The evaluation stages' inputs (test_evaluate, test_lmms_eval): a shapes corpus with a broken
# held-out shard, untrained tiny LLM exports reading the tiny tokenizer's codes, and their config.

TINY_LM = ("{model_type: qwen3, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
           "num_key_value_heads: 1, head_dim: 16, intermediate_size: 64, max_position_embeddings: 256, "
           "tie_word_embeddings: true}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models on shared CPUs: one intra-op thread is many times faster than a spinning pool.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A shapes corpus whose held-out split also holds a Parquet shard with one undecodable image
    and one sample without an image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenflow.data.manifest import corpus_manifest, index_shard
    from tokenflow.data.shapes import write_shapes_corpus

    root = tmp_path_factory.mktemp("eval-corpus")
    splits = write_shapes_corpus(str(root / "shapes"), num_samples=60, shard_size=30, seed=0, heldout_fraction=0.5)
    broken = root / "broken.parquet"
    pq.write_table(pa.table({"key": ["garbage", "no-image"], "image": [b"not an image", None],
                             "caption": ["x", "y"]}), broken)
    return corpus_manifest({"train": [index_shard(u) for u in splits["train"]],
                            "heldout": [index_shard(u) for u in [*splits["heldout"], str(broken)]]},
                           {"kind": "shapes"})


def _export(model, lm, meta: dict, out, tok) -> str:
    """Write an untrained model as the LLM stages export it (weights + metadata, text tokenizer)."""
    from tokenflow.models.llm_weights import TEXT_TOKENIZER_DIR, WEIGHTS_NAME, save_llm, save_text_tokenizer

    save_llm({k: v.clone() for k, v in model.state_dict().items()}, {**meta, "lm_config": lm.config.to_dict(), "attn_implementation": "sdpa"},
             str(out / WEIGHTS_NAME))
    save_text_tokenizer(tok, str(out / TEXT_TOKENIZER_DIR))
    return str(out)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, corpus, tiny_tokenizer_path):
    """Untrained (seeded) generator and understanding exports reading the tiny tokenizer's codes."""
    import yaml

    from tokenflow.config import LanguageModelConfig
    from tokenflow.data.corpus import iter_shard
    from tokenflow.models.generator import NextScaleGenerator
    from tokenflow.models.language_model import build_language_model
    from tokenflow.models.llm_weights import generator_meta
    from tokenflow.models.quantizer import CodebookFeatures
    from tokenflow.models.text import IMAGE_END, IMAGE_START, chat_answer, chat_prompt, train_bpe
    from tokenflow.models.understanding import UnderstandingModel
    from tokenflow.models.weights import load_tokenizer

    texts = []
    for record in corpus["splits"]["train"]["shards"]:
        for sample in iter_shard(record["url"]):
            texts.append(sample.caption)
            texts += [chat_prompt(q["question"]) + chat_answer(q["answer"])
                      for q in json.loads(sample.json)["questions"]]
    tok = train_bpe(texts, 400)
    codebook = CodebookFeatures.from_quantizer(load_tokenizer(tiny_tokenizer_path).quantizer)
    scales = list(codebook.scales)
    lm_cfg = LanguageModelConfig(architecture=yaml.safe_load(TINY_LM))
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    lm = build_language_model(lm_cfg, len(tok))
    start, end = tok.convert_tokens_to_ids(IMAGE_START), tok.convert_tokens_to_ids(IMAGE_END)
    model = NextScaleGenerator(lm, codebook, start, end, qk_norm=True)
    generator = _export(model, lm, generator_meta(model, "sdpa"), root / "generator", tok)
    lm = build_language_model(lm_cfg, len(tok))
    understanding = _export(UnderstandingModel(lm, codebook, tok.bos_token_id), lm,
                            {"kind": "understanding", "scales": scales, "bos_id": tok.bos_token_id},
                            root / "understanding", tok)
    return generator, understanding


def eval_config(out, *extra: str):
    """The tiny config with the tiny LM in both LLM stages, small evaluation sets and tracking into
    ``out``'s own MLflow store; ``extra`` overrides last."""
    from tokenflow.config import load_config

    from tests.conftest import MODEL_CONFIGS

    lm = f"language_model.architecture={TINY_LM}"
    return load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", [
        f"train_generator.{lm}", f"train_understanding.{lm}", "train_understanding.max_new_tokens=2",
        "train_generator.sampling={cfg_scale: 2.0, top_k: [20, 1], top_p: [0.8, 0.0]}",
        "eval.reconstruction.batch_size=8", "eval.generation.shapes_per_tag=2", "eval.generation.images_per_prompt=2",
        "eval.understanding.shapes_per_subtask=2", "eval.understanding.batch_size=4",
        "eval.pope.shapes_images=3", "eval.pope.batch_size=8", "eval.dpg.shapes_prompts=3", "eval.dpg.batch_size=8",
        f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}", *extra])
