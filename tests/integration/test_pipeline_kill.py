"""A pipeline killed (SIGKILL) during pre-tokenization finishes, on rerun, with outputs identical
to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tokenflow.data.manifest import LEASE_NAME, content_digest

from tests.conftest import REPO

SMALL = ["corpora.shapes.shapes.num_samples=360", "corpora.shapes.shapes.shard_size=30", "train_tokenizer.steps=2",
         "train_tokenizer.lr_schedule.warmup_steps=0", "train_tokenizer.checkpoint_every=2", "train_tokenizer.micro_batch_size=4",
         "pretokenize.num_actors=1", "pretokenize.batch_size=8", "pretokenize.micro_batch=8"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="local", DS_ACCELERATOR="cpu")
    return env


def _full(storage: Path, *args: str) -> list[str]:
    cmd = [sys.executable, "pipelines/full.py", "--config", "configs/pipelines/smoke.yaml", "--storage", str(storage)]
    return cmd + [f"--set={o}" for o in SMALL] + list(args)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_kill_during_pretokenize_then_rerun_matches_a_clean_run(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for stage in ("corpus.shapes", "train_tokenizer"):
        subprocess.run(_full(killed, "--only", stage), cwd=REPO, env=_env(), check=True, capture_output=True)
    shutil.copytree(killed, clean, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))

    proc = subprocess.Popen(_full(killed, "--only", "pretokenize.shapes"), cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            shards = list(killed.glob("pretokenize.shapes/*/shards/train/*.parquet"))
            if shards:
                break
            assert proc.poll() is None, "pretokenize finished before it could be killed"
            time.sleep(0.1)
        else:
            raise AssertionError("no token shard appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (out,) = killed.glob("pretokenize.shapes/*")
    assert not (out / "_MANIFEST.json").exists()  # really interrupted

    subprocess.run(_full(killed, "--only", "pretokenize.shapes"), cwd=REPO, env=_env(), check=True, capture_output=True)
    subprocess.run(_full(clean, "--only", "pretokenize.shapes"), cwd=REPO, env=_env(), check=True, capture_output=True)
    (reference,) = clean.glob("pretokenize.shapes/*")
    assert reference.name == out.name
    made, expected = _tree(out), _tree(reference)
    # Each manifest names the MLflow run that wrote it, each lease the run that held it (the lease
    # is never part of the output); everything else is byte-identical.
    manifests = [json.loads(tree.pop("_MANIFEST.json")) for tree in (made, expected)]
    leases = [json.loads(tree.pop(LEASE_NAME)) for tree in (made, expected)]
    assert all(lease["released"] for lease in leases) and leases[0]["owner"] != leases[1]["owner"]
    for tree in (made, expected):
        tree.pop(LEASE_NAME + ".lock", None)
    assert made == expected
    assert manifests[0]["mlflow_run_id"] != manifests[1]["mlflow_run_id"]
    assert content_digest(manifests[0]) == content_digest(manifests[1])
    assert {k: v for k, v in manifests[0].items() if k != "mlflow_run_id"} == {
        k: v for k, v in manifests[1].items() if k != "mlflow_run_id"}
