import re

import pytest

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


def test_local_path_downloads_files_and_directories_once_per_url(tmp_path):
    from tokenflow import storage

    storage.write_bytes_atomic("memory://lp/a/model.bin", b"weights")
    storage.write_bytes_atomic("memory://lp/b/model.bin", b"other")
    storage.write_bytes_atomic("memory://lp/tok/tokenizer.json", b"{}")
    storage.write_bytes_atomic("memory://lp/tok/special.json", b"[]")
    a = storage.local_path("memory://lp/a/model.bin", tmp_path)
    b = storage.local_path("memory://lp/b/model.bin", tmp_path)
    assert a != b and a.read_bytes() == b"weights" and b.read_bytes() == b"other"  # same basename, no clash
    assert storage.local_path("memory://lp/a/model.bin", tmp_path) == a
    tok = storage.local_path("memory://lp/tok", tmp_path)
    assert sorted(p.name for p in tok.iterdir()) == ["special.json", "tokenizer.json"]
    assert not list(tmp_path.rglob(".*.tmp"))
    local = tmp_path / "here.bin"
    local.write_bytes(b"x")
    assert storage.local_path(str(local), tmp_path / "cache") == local


@pytest.mark.parametrize("key", ["../../etc/passwd", "/abs/path", "a\x00b", "k" * 1000, "..", "", ".hidden",
                                 "dir/file", "s\udcff", "ünïcode"])
def test_a_key_from_the_data_becomes_one_safe_name(key, tmp_path):
    name = storage.safe_name(key)
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,95}", name), name
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_safe_names_keep_clean_keys_and_never_collide():
    assert storage.safe_name("shapes-000123_a.b") == "shapes-000123_a.b"
    keys = ["a/b", "a_b", "a\\b", "a b", "k" * 1000, "k" * 999 + "j"]
    assert len({storage.safe_name(k) for k in keys}) == len(keys)


def test_read_text_bounded_checks_existence_size_and_encoding_before_returning_text():
    storage.write_bytes_atomic("memory://rt/ok.txt", "\ufeffhello\n".encode())
    assert storage.read_text_bounded("memory://rt/ok.txt", 64, "test file") == "hello\n"  # BOM dropped
    with pytest.raises(FileNotFoundError, match="test file not found: memory://rt/none.txt"):
        storage.read_text_bounded("memory://rt/none.txt", 64, "test file")
    with pytest.raises(ValueError, match="9 bytes exceed the 8 a test file may have"):
        storage.read_text_bounded("memory://rt/ok.txt", 8, "test file")
    storage.write_bytes_atomic("memory://rt/bad.txt", b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8 text"):
        storage.read_text_bounded("memory://rt/bad.txt", 64, "test file")
