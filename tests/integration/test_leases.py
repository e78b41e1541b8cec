"""Stage output leases on local disk and on the S3 server: one run makes a stage, another waits
and reuses it; a dead holder's lease expires and is taken over; 'fail' names the holder."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from tokenflow import storage
from tokenflow.config import WorkflowConfig
from tokenflow.data.manifest import LEASE_NAME
from tokenflow.workflow.durable import StageOutput
from tokenflow.workflow.lease import LeaseRecord, StageBusy, StageLease, new_owner, stage_lease

FAST = WorkflowConfig(lease_ttl_s=1.5, lease_renew_s=0.3, busy_poll_s=0.1)


def _make(output: StageOutput, seconds: float) -> None:
    """A stand-in stage body: some work, then the manifest last."""
    time.sleep(seconds)
    storage.write_bytes_atomic(storage.join(output.url, "data.bin"), b"d")
    storage.write_json_atomic(output.manifest_url, {"files": {"data.bin": 1}})


def _holder(output: StageOutput) -> LeaseRecord:
    return LeaseRecord(**json.loads(storage.read_bytes(storage.join(output.url, LEASE_NAME))))


def test_two_runs_one_stage_runs_once_and_the_other_reuses_it(root):
    """Both start together; the stage body runs once, for longer than the lease's TTL (renewed)."""
    output = StageOutput.under(root, "stage", "h" * 64)
    made: list[str] = []
    results: dict[str, bool] = {}

    def run(owner: str) -> None:
        with stage_lease(output, owner, FAST, "stage") as must_run:
            results[owner] = must_run
            if must_run:
                made.append(owner)
                _make(output, 3 * FAST.lease_ttl_s)

    threads = [threading.Thread(target=run, args=(f"run-{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and sorted(results.values()) == [False, True], results
    assert output.complete()
    # left released: by the maker, or by the other run, which may take the released lease to
    # re-check the output under it before it reuses it
    holder = _holder(output)
    assert holder.released and holder.owner in results


def test_a_dead_runs_lease_expires_and_is_taken_over(root):
    output = StageOutput.under(root, "stage", "d" * 64)
    dead = LeaseRecord("killed-run", "elsewhere", 1, expires_at=time.time() + 0.5)
    assert storage.create_exclusive(storage.join(output.url, LEASE_NAME), dead.encode())
    owner = new_owner()
    start = time.monotonic()
    with stage_lease(output, owner, FAST, "stage") as must_run:
        assert must_run and time.monotonic() - start >= 0.4  # waited for the expiry
        assert _holder(output).owner == owner and not _holder(output).released
        _make(output, 0.0)
    assert _holder(output).released


def test_when_busy_fail_names_the_holder(root):
    output = StageOutput.under(root, "stage", "b" * 64)
    lease = StageLease(output, "first-run", FAST)
    assert lease.try_acquire() is None
    with pytest.raises(StageBusy, match="stage stage is being run by run first-run on .* workflow.when_busy is fail"):
        with stage_lease(output, "second-run", FAST.model_copy(update={"when_busy": "fail"}), "stage"):
            pass
    lease.release()
    with stage_lease(output, "second-run", FAST.model_copy(update={"when_busy": "fail"}), "stage") as must_run:
        assert must_run  # released, not complete: the second run makes it


def test_a_holder_whose_lease_was_taken_finds_out_at_its_next_renewal(root):
    output = StageOutput.under(root, "stage", "l" * 64)
    slow = StageLease(output, "paused-run", FAST)
    assert slow.try_acquire() is None
    time.sleep(FAST.lease_ttl_s + 0.1)  # paused past its TTL
    other = StageLease(output, "other-run", FAST)
    assert other.try_acquire() is None  # takes over
    assert not slow.renew() and slow.lost.is_set()
    assert other.renew() and _holder(output).owner == "other-run"
    slow.release()  # a lost lease is never released by its old holder
    assert not _holder(output).released


def test_unsupported_storage_runs_without_a_lease(tmp_path, caplog):
    output = StageOutput.under(f"memory://{os.getpid()}-lease", "stage", "m" * 64)
    with stage_lease(output, new_owner(), FAST, "stage") as must_run:
        assert must_run
    assert "no lease" in caplog.text


def test_two_pipeline_runs_at_once_make_the_stage_once(ray_local, tmp_path):
    """Two runs of one config on one storage, started together: the corpus stage runs in one of
    them; the other waits on the lease and records the stage as cached."""
    import mlflow

    from tokenflow.config import load_config
    from tokenflow.workflow.runner import run_pipeline

    from tests.conftest import MODEL_CONFIGS

    db, store = tmp_path / "mlflow.db", str(tmp_path / "store")
    cfg = load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", [
        "corpora.shapes.shapes={num_samples: 3000, shard_size: 500, seed: 1}", f"tracking.tracking_uri=sqlite:///{db}",
        "workflow={lease_ttl_s: 30, lease_renew_s: 5, busy_poll_s: 0.2}"])
    manifests: list[dict] = []
    threads = [threading.Thread(target=lambda: manifests.append(run_pipeline(cfg, store, "two.yaml", only="corpus.shapes")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(manifests) == 2 and manifests[0]["corpus.shapes"] == manifests[1]["corpus.shapes"]

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    stage_runs = client.search_runs([experiment], "tags.`tokenflow.stage` = 'corpus.shapes'")
    assert len(stage_runs) == 1 and stage_runs[0].info.status == "FINISHED"
    states = sorted(r.data.tags["tokenflow.stage.corpus.shapes"].split()[1]
                    for r in client.search_runs([experiment], "tags.`tokenflow.stage` = 'pipeline'"))
    assert states == ["cached", "complete"]
    assert LEASE_NAME not in manifests[0]["corpus.shapes"]["files"]


def test_a_killed_process_of_this_host_loses_its_lease_at_once(root):
    """A driver killed and re-submitted on the same head node does not wait for the expiry."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    output = StageOutput.under(root, "stage", "k" * 64)
    dead = LeaseRecord("killed-driver", socket.gethostname(), int(gone.stdout), expires_at=time.time() + 3600)
    assert storage.create_exclusive(storage.join(output.url, LEASE_NAME), dead.encode())
    start = time.monotonic()
    with stage_lease(output, new_owner(), FAST, "stage") as must_run:
        assert must_run and time.monotonic() - start < 1.0
