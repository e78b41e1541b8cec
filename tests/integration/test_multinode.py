"""The stages on a Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``):
work spreads over the nodes, a node lost mid-stage costs nothing, and every output equals the
single-node run's bytes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest

from tokenflow.config import load_config
from tokenflow.data.token_shards import read_table
from tokenflow.stages.pretokenize import run_pretokenize
from tokenflow.stages.train_tokenizer import run_train_tokenizer

from tests.conftest import MODEL_CONFIGS, one_corpus
from tests.integration.conftest import RUNTIME_ENV, shapes_corpus, start_local_ray

TINY = MODEL_CONFIGS / "tokenflow-tiny.yaml"
NODE = {"num_cpus": 2, "object_store_memory": 80 * 2**20}
TRAIN = ["train_tokenizer.num_workers=2", "train_tokenizer.cpus_per_worker=1", "train_tokenizer.micro_batch_size=2",
         "train_tokenizer.steps=3", "train_tokenizer.checkpoint_every=3", "train_tokenizer.log_every=1",
         "train_tokenizer.image_every=3", "train_tokenizer.heldout_images=4"]
PRETOKENIZE = "pretokenize={batch_size: 32, micro_batch: 16, num_actors: 3}"


def _config(db: Path, *overrides: str):
    return load_config(TINY, [*overrides, f"tracking.tracking_uri=sqlite:///{db}"])


def _tag(db: Path, run_id: str, key: str):
    return json.loads(mlflow.MlflowClient(f"sqlite:///{db}").get_run(run_id).data.tags[key])


def _shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "shards").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def single_node(ray_local, token_corpus, tmp_path_factory) -> Path:
    """The tokenizer trained on the session's single node (2 workers packed on it)."""
    out = tmp_path_factory.mktemp("single-node")
    run_train_tokenizer(_config(out / "mlflow.db", *TRAIN), one_corpus(token_corpus), str(out))
    return out


@pytest.fixture(scope="module")
def cluster(single_node, token_shards):
    """A head and two worker nodes of 2 CPUs each; this process is their driver for the module,
    then reconnects to the session's single node."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=RUNTIME_ENV)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    start_local_ray()


def test_pretokenize_spreads_over_nodes_and_writes_the_single_node_bytes(cluster, token_corpus, token_shards,
                                                                         tiny_tokenizer_path, tmp_path):
    db, out = tmp_path / "mlflow.db", tmp_path / "tokens"
    manifest = run_pretokenize(_config(db, PRETOKENIZE), "pretokenize", token_corpus, str(tiny_tokenizer_path),
                               str(out))
    per_node = _tag(db, manifest["mlflow_run_id"], "tokenflow.shards_per_node")
    assert len(per_node) >= 2 and sum(per_node.values()) == 5, per_node
    single, single_url = token_shards
    assert manifest["splits"] == single["splits"]
    assert _shard_files(out) == _shard_files(Path(single_url))


def test_training_workers_spread_over_nodes_and_match_the_single_node_run(cluster, token_corpus, single_node,
                                                                          tmp_path):
    db = tmp_path / "mlflow.db"
    manifest = run_train_tokenizer(_config(db, *TRAIN, "train_tokenizer.placement_strategy=SPREAD"), one_corpus(token_corpus),
                                   str(tmp_path))
    nodes = _tag(db, manifest["mlflow_run_id"], "tokenflow.worker_nodes")
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    assert (tmp_path / "tokenizer.safetensors").read_bytes() == (single_node / "tokenizer.safetensors").read_bytes()


@pytest.fixture(scope="module")
def large_corpus(tmp_path_factory) -> dict:
    """Enough shards (24 of 40 images) that removing a node lands while its actor is encoding."""
    return shapes_corpus(tmp_path_factory.mktemp("node-loss-corpus"), num_samples=960, shard_size=40, seed=3,
                         heldout_fraction=0.25)


def test_node_lost_mid_pretokenize_changes_no_byte(cluster, large_corpus, tiny_tokenizer_path, tmp_path):
    """A worker node removed while the stage runs: its actor's shard is retried on the survivors,
    the stage completes, and its output equals the undisturbed run's, every sample once."""
    undisturbed = run_pretokenize(_config(tmp_path / "a.db", PRETOKENIZE), "pretokenize", large_corpus,
                                  str(tiny_tokenizer_path), str(tmp_path / "undisturbed"))
    out = tmp_path / "disturbed"
    victim = next(iter(cluster.worker_nodes))
    written_before_loss: list[int] = []

    def remove_while_encoding() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(out.glob("shards/*/*.parquet"))) < 3:
            time.sleep(0.02)
        written_before_loss.append(len(list(out.glob("shards/*/*.parquet"))))
        cluster.remove_node(victim, allow_graceful=False)

    remover = threading.Thread(target=remove_while_encoding, daemon=True)
    remover.start()
    disturbed = run_pretokenize(_config(tmp_path / "b.db", PRETOKENIZE), "pretokenize", large_corpus,
                                str(tiny_tokenizer_path), str(out))
    remover.join()

    assert victim not in cluster.worker_nodes and written_before_loss[0] < 12  # lost mid-stage
    assert disturbed["splits"] == undisturbed["splits"]
    assert _shard_files(out) == _shard_files(tmp_path / "undisturbed")
    keys = [k for p in sorted(out.glob("shards/*/*.parquet")) for k in read_table(str(p))["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == 960
