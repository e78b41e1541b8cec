"""Broken shard containers end as one shard-level record with a reason, the readable samples
before the damage are kept, and a shard replaced since it was indexed is refused."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenflow.data.corpus import SourceChangedError, iter_shard
from tokenflow.data.manifest import index_shard


def _tar(path, n: int) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("png", b"\x89PNG not really"), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _parquet(path, n: int) -> None:
    pq.write_table(pa.table({"key": [f"s{i}" for i in range(n)], "image": [b"img"] * n, "caption": ["c"] * n}),
                   path, row_group_size=2)


@pytest.mark.parametrize("name,write", [("zero.tar", lambda p: p.write_bytes(b"")),
                                        ("zero.parquet", lambda p: p.write_bytes(b"")),
                                        ("junk.parquet", lambda p: p.write_bytes(b"PAR1 not a parquet file"))])
def test_an_empty_or_foreign_shard_is_one_record_with_a_reason(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    record = index_shard(str(path))
    samples = list(iter_shard(str(path), record.sha256))
    assert [s.key for s in samples] == [f"{name}#unreadable"]
    assert samples[0].problem.startswith("unreadable_" + ("tar" if name.endswith(".tar") else "parquet"))
    assert (record.samples, record.unusable) == (1, 1)


def test_a_cut_off_parquet_file_is_one_record(tmp_path):
    whole = tmp_path / "whole.parquet"
    _parquet(whole, 6)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[:-20])  # the footer is gone
    samples = list(iter_shard(str(cut)))
    assert len(samples) == 1 and samples[0].problem.startswith("unreadable_parquet: ")


def test_a_tar_cut_mid_member_keeps_the_samples_before_the_cut(tmp_path):
    whole = tmp_path / "whole.tar"
    _tar(whole, 5)
    with tarfile.open(whole) as tar:
        cut_at = tar.getmembers()[6].offset_data + 3  # inside the 4th sample's image
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:cut_at])
    samples = list(iter_shard(str(cut)))
    assert [s.key for s in samples[:3]] == ["s0", "s1", "s2"] and all(s.problem is None for s in samples[:3])
    assert samples[-1].key == "cut.tar#unreadable" and samples[-1].problem.startswith("unreadable_tar: ")


def test_a_shard_replaced_since_it_was_indexed_is_refused(tmp_path):
    path = tmp_path / "s.parquet"
    _parquet(path, 4)
    record = index_shard(str(path))
    assert len(list(iter_shard(str(path), record.sha256))) == 4
    _parquet(path, 5)
    with pytest.raises(SourceChangedError, match=r"s.parquet changed since the corpus was indexed"):
        iter_shard(str(path), record.sha256)


def test_digests_read_from_whole_image_shards_two_at_a_time(tmp_path, monkeypatch):
    """A corpus output without digest files has its image shards read whole: however many
    threads ask (deduplication reads 16 shards ahead), at most two are in memory at once."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tokenflow.data import manifest
    from tokenflow.data.corpus import RawSample

    lock, active, peak = threading.Lock(), [0], [0]

    def read_whole(record):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return [RawSample(key="k", image=b"img")]

    monkeypatch.setattr(manifest, "iter_record", read_whole)
    records = [manifest.ShardRecord(f"/s/{i}.tar", f"{i}.tar", "webdataset", 1, 0, 1, "x") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: manifest.sample_digests(str(tmp_path), "train", r), records))
    assert all(len(r) == 1 for r in results) and peak[0] == 2
