from tokenflow import storage


def test_is_local_tells_disk_from_other_filesystems(tmp_path):
    assert storage.is_local(str(tmp_path)) and storage.is_local(tmp_path.as_uri())
    assert not storage.is_local("memory://bucket/x")


def test_atomic_write_and_stale_temp_cleanup(tmp_path):
    url = storage.join(str(tmp_path), "a", "b.json")
    storage.write_json_atomic(url, {"z": 1, "a": 2})
    assert storage.read_json(url) == {"a": 2, "z": 1}
    assert (tmp_path / "a" / "b.json").read_text().index('"a"') < (tmp_path / "a" / "b.json").read_text().index('"z"')
    (tmp_path / "a" / "c.parquet.tmp-1234abcd").write_bytes(b"partial")
    assert storage.remove_stale_temps(str(tmp_path)) == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]
    storage.write_bytes_atomic("memory://t/x.bin", b"abc")
    assert storage.read_bytes("memory://t/x.bin") == b"abc"
