"""The storage contract every stage relies on, on local disk and on a real S3 server (SeaweedFS):
whole-object commits, listings, digests, cached downloads, conditional writes, and a stage that
counts as complete only when its manifest is present and every file it lists is there."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq

from tokenflow import storage
from tokenflow.data.manifest import MANIFEST_NAME, directory_digests, file_digest
from tokenflow.workflow.durable import StageOutput


def test_whole_object_commits_listing_and_digests(root):
    storage.write_json_atomic(storage.join(root, "a", "b.json"), {"z": 1, "a": 2})
    storage.write_bytes_atomic(storage.join(root, "a", "c.bin"), b"x" * 1000)
    storage.write_bytes_atomic(storage.join(root, "a", "c.bin"), b"y" * 10)  # overwrite in place
    storage.write_bytes_atomic(storage.join(root, "checkpoints", "run", "state.pt"), b"s")
    assert storage.read_json(storage.join(root, "a", "b.json")) == {"a": 2, "z": 1}
    assert storage.file_sizes(root) == {"a/b.json": len(storage.read_bytes(storage.join(root, "a", "b.json"))),
                                        "a/c.bin": 10, "checkpoints/run/state.pt": 1}
    assert set(storage.file_sizes(root, exclude=("checkpoints",))) == {"a/b.json", "a/c.bin"}
    assert file_digest(storage.join(root, "a", "c.bin")) == (10, hashlib.sha256(b"y" * 10).hexdigest())
    assert directory_digests(storage.join(root, "checkpoints")) == {"run/state.pt": hashlib.sha256(b"s").hexdigest()}
    assert storage.file_sizes(storage.join(root, "absent")) == {}


def test_pyarrow_sees_the_same_objects(root):
    """Ray Train and Ray Data get their filesystem from here: same endpoint, same objects."""
    fs, path = storage.pyarrow_filesystem(storage.join(root, "t.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    fsspec_fs, fsspec_path = storage.filesystem(storage.join(root, "t.parquet"))
    with fsspec_fs.open(fsspec_path, "rb") as f:
        assert pq.read_table(f).column("x").to_pylist() == [1, 2, 3]


def test_cached_download_follows_an_object_rewritten_in_place(root, tmp_path):
    url = storage.join(root, "model", "weights.bin")
    storage.write_bytes_atomic(url, b"first")
    first = storage.local_path(url, tmp_path / "cache")
    assert first.read_bytes() == b"first" and storage.local_path(url, tmp_path / "cache") == first
    time.sleep(1.1)  # object stores and filesystems stamp whole seconds
    storage.write_bytes_atomic(url, b"second version")
    assert storage.local_path(url, tmp_path / "cache").read_bytes() == b"second version"


def test_stage_is_complete_only_with_its_manifest_and_every_listed_file(root):
    out = StageOutput("demo", "0" * 64, storage.join(root, "demo", "000000000000"))
    storage.write_bytes_atomic(storage.join(out.url, "data", "part-0.bin"), b"p" * 100)
    assert not out.complete()  # data written, manifest not yet
    storage.write_json_atomic(out.manifest_url, {"files": storage.file_sizes(out.url, exclude=(MANIFEST_NAME,))})
    assert out.complete()
    fs, path = storage.filesystem(storage.join(out.url, "data", "part-0.bin"))
    fs.rm(path)  # an object lost after completion (a lifecycle rule, a careless delete)
    assert not out.complete()


_SLOW_WRITER = """
import sys, time
from tokenflow import storage
fs, path = storage.filesystem(sys.argv[1])
with fs.open(path, "wb", block_size=5 * 2**20) as f:  # multipart on object stores
    for _ in range(4):
        f.write(b"z" * (6 * 2**20))
        f.flush()
        print("wrote", flush=True)
        time.sleep(0.5)
    time.sleep(60)
"""


def test_a_writer_killed_mid_object_leaves_nothing_that_looks_written(root):
    """Killed between parts of a large upload: the object never appears (object stores publish
    on completion; locally the stage's temp-then-rename leaves only a temp that cleanup removes)."""
    target = storage.join(root, "shard.parquet")
    url = target if not storage.is_local(root) else target + ".tmp-deadbeef"
    if storage.is_local(root):
        os.makedirs(root, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, url], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    for _ in range(3):
        assert proc.stdout.readline().startswith("wrote")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not storage.exists(target)
    storage.remove_stale_temps(root)
    assert storage.file_sizes(root) == {}


def test_conditional_writes_let_exactly_one_writer_win(root):
    url = storage.join(root, "lease", "x.json")
    assert storage.read_versioned(url) is None
    assert storage.create_exclusive(url, b"one")
    assert not storage.create_exclusive(url, b"two")
    data, version = storage.read_versioned(url)
    assert data == b"one"
    assert storage.replace_if(url, b"three", version)
    assert not storage.replace_if(url, b"four", version)  # a stale version loses
    assert storage.read_versioned(url)[0] == b"three"
    assert not storage.replace_if(storage.join(root, "lease", "absent.json"), b"x", version)


def test_compare_and_swap_loses_no_update_under_contention(root):
    """Four threads each add 1 five times through read + replace_if: the counter ends at 20."""
    url = storage.join(root, "counter")
    assert storage.create_exclusive(url, b"0")

    def add_one_five_times() -> None:
        for _ in range(5):
            while True:
                data, version = storage.read_versioned(url)
                if storage.replace_if(url, str(int(data) + 1).encode(), version):
                    break

    threads = [threading.Thread(target=add_one_five_times) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.read_versioned(url)[0] == b"20"
