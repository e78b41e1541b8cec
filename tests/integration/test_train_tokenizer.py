"""Tokenizer training on 2 Ray Train workers, each with DeepSpeed engines on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tokenflow.config import CorpusConfig, ShapesCorpusConfig, load_config
from tokenflow.models.weights import file_sha256
from tokenflow.stages.corpus import build_corpus
from tokenflow.stages.train_tokenizer import run_train_tokenizer

from tests.conftest import MODEL_CONFIGS, REPO, one_corpus
from tests.integration.conftest import worker_killer

TINY = MODEL_CONFIGS / "tokenflow-tiny.yaml"
FAST = ["train_tokenizer.num_workers=2", "train_tokenizer.cpus_per_worker=0.5",
        "train_tokenizer.micro_batch_size=2", "train_tokenizer.log_every=1",
        "train_tokenizer.image_every=4", "train_tokenizer.heldout_images=4",
        "tokenizer.discriminator.start_step=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(CorpusConfig(shapes=ShapesCorpusConfig(num_samples=96, shard_size=16, seed=5)), str(out))
    return out


def _data(corpus: Path) -> list:
    """The stage's one-corpus mixture: the corpus at ``corpus``."""
    from tokenflow import storage

    return one_corpus(storage.read_json(str(corpus / "_MANIFEST.json")), str(corpus))


def _history(db: Path, metric: str) -> dict[int, float]:
    """Last logged value per step (a resumed run re-logs the steps after its checkpoint)."""
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("tokenflow").experiment_id])[0]
    values: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.timestamp):
        values[m.step] = m.value
    return values


def _cmd(corpus: Path, out: Path | str, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, str(REPO / "pipelines" / "train_tokenizer.py"), "--config", str(TINY),
           "--corpus", str(corpus), "--out", str(out)]
    for item in [*FAST, *overrides]:
        cmd += ["--set", item]
    return cmd


def test_zero3_two_workers_train_and_log_everything_promised(ray_local, corpus, tmp_path):
    out = tmp_path / "zero3"
    # Its own store: earlier tests' mlflow.set_tracking_uri leaves MLFLOW_TRACKING_URI in this process.
    cfg = load_config(TINY, [*FAST, "train_tokenizer.steps=4", "train_tokenizer.checkpoint_every=4",
                             "train_tokenizer.deepspeed=zero3", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
                             "tracking.system_metrics_every_s=1"])
    manifest = run_train_tokenizer(cfg, _data(corpus), str(out))
    assert (out / "tokenizer.safetensors").stat().st_size == manifest["tokenizer"]["bytes"]

    from tokenflow.models.weights import load_tokenizer

    model = load_tokenizer(out / "tokenizer.safetensors")  # the ZeRO-3 partitions were gathered
    assert model.teacher is None and model.encode(__import__("torch").rand(1, 3, 64, 64)).shape == (1, 130)

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for param in ("config_hash", "git_commit", "input.corpus.shapes", "train_tokenizer.deepspeed",
                  "tokenizer.quantizer.codebook_size"):
        assert param in run.data.params, param
    assert run.data.params["train_tokenizer.deepspeed"] == "zero3"
    for metric in ("loss/total", "loss/l2", "loss/semantic", "loss/vq", "loss/commit", "loss/gan",
                   "loss/disc", "codebook/usage", "codebook/perplexity", "samples_per_s", "lr",
                   "heldout/psnr", "heldout/psnr_mean_color"):
        assert len(client.get_metric_history(run.info.run_id, metric)) >= 1, metric
    assert len(client.get_metric_history(run.info.run_id, "loss/total")) == 4
    assert client.get_metric_history(run.info.run_id, "loss/disc")[-1].value > 0  # GAN started
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]  # step images (UI slider)
    assert any(path.startswith("images/heldout_reconstructions+step+4+") and path.endswith(".png") for path in images)
    assert "system/node-0/cpu_utilization_percentage" in run.data.metrics  # the node's first worker samples it
    assert "system/node-0/system_memory_usage_megabytes" in run.data.metrics
    assert run.data.tags["tokenflow.tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    assert run.data.tags["tokenflow.input.corpus.shapes"] == run.data.params["input.corpus.shapes"]


# Checkpoints every 2 of 10 steps: each one is a barrier of a second or more, so the kill after
# the first checkpoint lands well before the end. A warmup + cosine schedule, so resume must also
# restore the scheduler's position.
RESUME_STEPS = ["train_tokenizer.steps=10", "train_tokenizer.checkpoint_every=2",
                "train_tokenizer.lr_schedule.warmup_steps=3", "train_tokenizer.lr_schedule.decay=cosine"]


def _subprocess_env() -> dict[str, str]:
    # mlflow.set_tracking_uri in this process exports MLFLOW_TRACKING_URI; each run names its store.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="local")
    return env


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory) -> tuple[Path, Path]:
    """(output dir, tracking db) of the run the interrupted ones must reproduce."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out, db = root / "out", root / "mlflow.db"
    subprocess.run(_cmd(corpus, out, [*RESUME_STEPS, f"tracking.tracking_uri=sqlite:///{db}"]),
                   env=_subprocess_env(), check=True, capture_output=True)
    return out, db


@pytest.mark.parametrize("where", ["local", "s3"])
def test_zero2_killed_job_resumes_with_identical_losses(where, corpus, uninterrupted, tmp_path, request):
    """SIGKILLed after its first checkpoint, the job resumes from it, on local disk and on S3
    (Ray Train's checkpoints through the same fsspec filesystem), to the uninterrupted losses."""
    from tokenflow import storage

    killed = str(tmp_path / "killed") if where == "local" else request.getfixturevalue("s3_url")
    db = tmp_path / "killed.db"
    cmd = _cmd(corpus, killed, [*RESUME_STEPS, f"tracking.tracking_uri=sqlite:///{db}"])
    proc = subprocess.Popen(cmd, env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    fs, path = storage.filesystem(storage.join(killed, "checkpoints", "train"))
    deadline = time.time() + 400
    while time.time() < deadline and not fs.glob(f"{path}/checkpoint_*/rank1.json"):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.exists(storage.join(killed, "_MANIFEST.json")), "the kill must land before the end"
    subprocess.run(cmd, env=_subprocess_env(), check=True, capture_output=True)

    clean_out, clean_db = uninterrupted
    expected, resumed = _history(clean_db, "loss/total"), _history(db, "loss/total")
    assert sorted(expected) == sorted(resumed) == list(range(1, 11))
    for step in expected:
        assert abs(expected[step] - resumed[step]) <= 1e-6, (step, expected[step], resumed[step])
    assert _history(clean_db, "lr") == _history(db, "lr")
    assert (clean_out / "tokenizer.safetensors").read_bytes() == storage.read_bytes(
        storage.join(killed, "tokenizer.safetensors"))


def test_lost_worker_restarts_the_group_from_its_checkpoint(ray_local, corpus, uninterrupted, tmp_path):
    """One SIGKILLed worker: Ray Train restarts the worker group (``max_failures``), which
    resumes from the latest checkpoint and ends with the uninterrupted losses and export; the
    stage's run records the resume."""
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    cfg = load_config(TINY, [*FAST, *RESUME_STEPS, f"tracking.tracking_uri=sqlite:///{db}"])
    killer = worker_killer(out / "checkpoints")
    killer.start()
    run_train_tokenizer(cfg, _data(corpus), str(out))
    killer.join()
    assert killer.killed is not None

    clean_out, clean_db = uninterrupted
    expected, survived = _history(clean_db, "loss/total"), _history(db, "loss/total")
    assert sorted(survived) == list(range(1, 11))
    for step in expected:
        assert abs(expected[step] - survived[step]) <= 1e-6, (step, expected[step], survived[step])
    resumes = _history(db, "resumed_from_step")
    assert len(resumes) == 1 and all(step == value and step % 2 == 0 and step < 10
                                     for step, value in resumes.items()), resumes
    assert (clean_out / "tokenizer.safetensors").read_bytes() == (out / "tokenizer.safetensors").read_bytes()


def test_corrupt_latest_checkpoint_falls_back_or_fails_as_configured(ray_local, corpus, tmp_path):
    out, db = tmp_path / "run", tmp_path / "mlflow.db"

    def train(steps: int, *extra: str) -> dict:
        cfg = load_config(TINY, [*FAST, f"train_tokenizer.steps={steps}", "train_tokenizer.checkpoint_every=2",
                                 "train_tokenizer.max_failures=0", f"tracking.tracking_uri=sqlite:///{db}", *extra])
        return run_train_tokenizer(cfg, _data(corpus), str(out))

    train(4)
    checkpoints = out / "checkpoints" / "train"
    latest = checkpoints / "checkpoint_0000004_from_0000000_w2"
    optim = sorted(latest.glob("generator/state/*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[:100])
    with pytest.raises(Exception, match=r"checkpoint_0000004_from_0000000_w2 does not verify: generator/state/\S+"
                                        r"optim_states.pt has 100 bytes"):
        train(6, "train_tokenizer.corrupt_checkpoint=fail")

    result = train(6)  # falls back to step 2, with a warning and a tag naming the bad checkpoint
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["tokenflow.checkpoints_skipped"].startswith(
        "checkpoint_0000004_from_0000000_w2: generator/state/")
    assert client.get_metric_history(run.info.run_id, "resumed_from_step")[-1].value == 2.0
    # The new attempt's checkpoints went to new directories; Ray Train then kept the newest two.
    assert sorted(p.name for p in checkpoints.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_0000004_from_0000002_w2", "checkpoint_0000006_from_0000002_w2"]

    # Someone with write access to the bucket plants a pickled command in every checkpoint and
    # rewrites the digests to match: refused before DeepSpeed unpickles anything, never run.
    marker = tmp_path / "pwned"
    for rank_file in checkpoints.glob("checkpoint_*/rank*.json"):
        state = json.loads(rank_file.read_text())
        for name in [n for n in state["files"] if n.endswith("model_states.pt")]:
            planted = rank_file.parent / name
            torch.save({"module": _Payload(marker)}, planted)
            state["files"][name] = {"bytes": planted.stat().st_size, "sha256": file_sha256(planted)}
        rank_file.write_text(json.dumps(state))
    refused = r"no checkpoint verifies, refusing to start from scratch: .*pickles posix.system"
    with pytest.raises(Exception, match=refused):
        train(8)
    assert not marker.exists()


class _Payload:
    """Unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_decoder_finetune_stage_trains_only_the_decoder(ray_local, corpus, tmp_path):
    """The finetune_decoder stage on the trained export: an enhanced (wider) pixel decoder trains
    on the pixel losses alone; every other tensor, and so every token, is the trained export's."""
    from tokenflow.models.weights import load_tokenizer
    from tokenflow.stages.train_tokenizer import run_finetune_decoder

    out = tmp_path / "tokenizer"
    store = [f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    trained = run_train_tokenizer(load_config(TINY, [*FAST, *store, "train_tokenizer.steps=2"]), _data(corpus),
                                  str(out))
    tune = ["finetune_decoder={steps: 3, checkpoint_every: 3, num_workers: 2, cpus_per_worker: 0.5, "
            "micro_batch_size: 2, log_every: 1, image_every: 3, heldout_images: 4, decoder_ch: 32}"]
    cfg = load_config(TINY, [*FAST, *store, *tune])
    tuned = run_finetune_decoder(cfg, _data(corpus), str(out / "tokenizer.safetensors"),
                                 trained["tokenizer"]["sha256"], str(tmp_path / "decoder"))
    assert tuned["inputs"]["tokenizer"] == trained["tokenizer"]["sha256"]
    base = load_tokenizer(out / "tokenizer.safetensors")
    model = load_tokenizer(tmp_path / "decoder" / "tokenizer.safetensors")
    assert model.cfg.pixel_codec.decoder_ch == 32 and base.cfg.pixel_codec.decoder_ch is None
    base_state, state = base.state_dict(), model.state_dict()
    for key, value in state.items():
        if not key.startswith("pixel_decoder."):
            assert torch.equal(value, base_state[key]), key
    images = torch.rand(3, 3, 64, 64)
    assert torch.equal(model.encode(images), base.encode(images))

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(tuned["mlflow_run_id"])
    assert run.data.params["finetune_decoder.decoder_ch"] == "32"
    assert len(client.get_metric_history(run.info.run_id, "loss/l2")) == 3
    assert not client.get_metric_history(run.info.run_id, "loss/semantic")  # the pixel terms only
    assert client.get_metric_history(run.info.run_id, "heldout/psnr")
