"""Corpus formats beyond the defaults: webdataset captions from .json, img2dataset output,
Parquet tables with other column names and Hugging Face image structs, LLaVA JSON packed into
Parquet shards; the reader options travel in the corpus manifest to every later reader."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, replace

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tokenflow.config import CorpusConfig, LlavaConfig, ParquetColumnsConfig, SampleLimitsConfig, WebdatasetConfig
from tokenflow.data.corpus import (DEFAULT, CorpusError, ReaderOptions, SourceChangedError, img2dataset_status,
                                   iter_record, iter_shard, list_shards, resolve_listing)
from tokenflow.data.decode import decode_image
from tokenflow.data.examples import conversation
from tokenflow.data.llava import llava_records, pack_llava_shard, plan_llava_shards
from tokenflow.data.manifest import ShardRecord, corpus_manifest, index_shard, shard_records


def _image(color: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


RED, BLUE, GREEN = _image((255, 0, 0)), _image((0, 0, 255), "JPEG"), _image((0, 160, 0), size=(5, 5))


def _tar(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _by_key(url: str, reader: ReaderOptions = DEFAULT) -> dict:
    return {s.key: s for s in iter_shard(url, reader=reader)}


# --- webdataset -------------------------------------------------------------------------------

@pytest.fixture
def captioned_tar(tmp_path) -> str:
    return _tar(tmp_path / "caps-000000.tar", {
        "txt": {"png": RED, "txt": b"from txt", "json": json.dumps({"caption": "not this one"}).encode()},
        "json_only": {"jpg": BLUE, "json": json.dumps({"caption": "from json", "url": "http://x"}).encode()},
        "invalid": {"png": GREEN, "json": b'{"caption": "cut off'},
        "not_a_string": {"png": RED, "json": b'{"caption": ["a", "b"]}'},
        "no_text": {"png": RED},
    })


def test_webdataset_caption_from_txt_else_from_the_json_field(captioned_tar):
    samples = _by_key(captioned_tar, ReaderOptions())
    assert {k: s.caption for k, s in samples.items()} == {
        "txt": "from txt", "json_only": "from json", "invalid": None, "not_a_string": None, "no_text": None}
    assert samples["invalid"].json == '{"caption": "cut off' and samples["invalid"].problem is None
    assert samples["json_only"].image == BLUE and decode_image(samples["json_only"].image).size == (8, 6)
    assert all(s.problem is None for s in samples.values())


def test_webdataset_json_captions_follow_the_configured_field(captioned_tar):
    assert _by_key(captioned_tar)["json_only"].caption is None  # DEFAULT: .txt only, as before the options
    assert _by_key(captioned_tar, ReaderOptions(caption_json_key="url"))["json_only"].caption == "http://x"
    cfg = CorpusConfig(source="url", url=captioned_tar, webdataset=WebdatasetConfig(caption_json_key=None))
    assert _by_key(captioned_tar, ReaderOptions.from_config(cfg, "webdataset"))["json_only"].caption is None


def test_a_json_caption_past_the_sample_limits_is_no_caption(tmp_path):
    deep = "[" * 100 + "]" * 100
    url = _tar(tmp_path / "deep.tar", {"a": {"png": RED, "json": f'{{"caption": "c", "x": {deep}}}'.encode()}})
    sample = next(iter_shard(url, reader=ReaderOptions()))
    assert sample.caption is None and sample.json.endswith("]}") and sample.problem is None


# --- img2dataset --------------------------------------------------------------------------------

def _img2dataset_shard(root, n: int, statuses: list[str]) -> None:
    """One img2dataset output shard: the tar of the downloaded images, the side Parquet of every
    URL tried and the stats file."""
    stem = f"{n:05d}"
    ok = [i for i, s in enumerate(statuses) if s == "success"]
    _tar(root / f"{stem}.tar", {f"{stem}{i:04d}": {
        "jpg": BLUE, "txt": f"caption {i}".encode(),
        "json": json.dumps({"url": f"http://img/{i}", "caption": f"caption {i}", "key": f"{stem}{i:04d}",
                            "status": "success"}).encode()} for i in ok})
    pq.write_table(pa.table({"url": [f"http://img/{i}" for i in range(len(statuses))],
                             "key": [f"{stem}{i:04d}" for i in range(len(statuses))], "status": statuses,
                             "error_message": [None if s == "success" else "boom" for s in statuses]}),
                   root / f"{stem}.parquet")
    (root / f"{stem}_stats.json").write_text(json.dumps({"count": len(statuses), "successes": len(ok)}))


def test_img2dataset_output_is_webdataset_with_its_status_counts(tmp_path):
    _img2dataset_shard(tmp_path, 0, ["success", "failed_to_download", "success"])
    _img2dataset_shard(tmp_path, 1, ["failed_to_resize", "success", "failed_to_download"])
    tars = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert resolve_listing(str(tmp_path)) == ("webdataset", tars)
    assert list_shards(str(tmp_path), "webdataset") == list_shards(str(tmp_path)) == tars
    assert img2dataset_status(tars) == {"success": 3, "failed_to_download": 2, "failed_to_resize": 1}
    samples = [s for url in tars for s in iter_shard(url, reader=ReaderOptions(format="webdataset"))]
    assert [s.key for s in samples] == ["000000000", "000000002", "000010001"]
    assert [s.caption for s in samples] == ["caption 0", "caption 2", "caption 1"]
    assert resolve_listing(str(tmp_path), "parquet")[1] == [str(tmp_path / "00000.parquet"),
                                                            str(tmp_path / "00001.parquet")]


def test_listing_formats(tmp_path, captioned_tar):
    assert img2dataset_status([captioned_tar]) == {}  # no side files
    pq.write_table(pa.table({"key": ["k"], "image": [RED], "caption": ["c"]}), tmp_path / "table.parquet")
    with pytest.raises(CorpusError, match="mixes webdataset and parquet"):
        list_shards(str(tmp_path))
    assert list_shards(str(tmp_path), "parquet") == [str(tmp_path / "table.parquet")]
    assert list_shards(str(tmp_path / "*.tar")) == [captioned_tar]
    with pytest.raises(CorpusError, match="no .tar shards found"):
        list_shards(str(tmp_path / "*.parquet"), "webdataset")
    with pytest.raises(CorpusError, match="a webdataset shard, but the corpus format is parquet"):
        list_shards(captioned_tar, "parquet")


# --- Parquet ------------------------------------------------------------------------------------

def test_parquet_with_configured_column_names(tmp_path):
    url = str(tmp_path / "custom.parquet")
    pq.write_table(pa.table({"sample_id": ["a", "b", "c"], "jpg": [RED, None, BLUE], "text": ["red", "none", None],
                             "meta": ['{"k": 1}', None, "{}"], "extra": [1, 2, 3]}), url)
    cfg = CorpusConfig(source="url", url=url, columns=ParquetColumnsConfig(
        key="sample_id", image="jpg", caption="text", metadata="meta"))
    reader = ReaderOptions.from_config(cfg, "parquet")
    assert reader == ReaderOptions("parquet", "caption", "sample_id", "jpg", "text", "meta")
    samples = _by_key(url, reader)
    assert [(k, s.image, s.caption, s.json, s.problem) for k, s in samples.items()] == [
        ("a", RED, "red", '{"k": 1}', None), ("b", None, "none", None, "missing_image"), ("c", BLUE, None, "{}", None)]
    record = index_shard(url, reader)
    assert (record.samples, record.unusable, record.format, record.reader) == (3, 1, "parquet", reader)


def test_parquet_image_struct_column_without_keys_or_captions(tmp_path):
    """What Hugging Face datasets writes for an ``Image`` feature: struct<bytes, path>."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": RED, "path": "a.png"}, {"bytes": None, "path": "gone.png"}, None, {"bytes": BLUE, "path": None}]
    url = str(tmp_path / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"image": pa.array(cells, image_type), "label": [0, 1, 2, 3]}), url, row_group_size=3)
    reader = ReaderOptions(format="parquet", key_column=None, caption_column=None)
    samples = list(iter_shard(url, reader=reader))
    assert [s.key for s in samples] == [f"train-00000-of-00001-{i}" for i in range(4)]
    assert [s.problem for s in samples] == [None, "missing_image", "missing_image", None]
    assert [s.image for s in samples] == [RED, None, None, BLUE]
    assert all(s.caption is None and s.json is None for s in samples)
    assert decode_image(samples[3].image).size == (8, 6)


@pytest.mark.parametrize("reader,message", [
    (ReaderOptions(image_column="png"), r"no column 'png' \(the file has \['key', 'image', 'caption', 'tags'\]"),
    (ReaderOptions(key_column="id", caption_column="text"), r"no column 'id', 'text'"),
    (ReaderOptions(caption_column="tags"), r"column 'tags' is list<\w+: string>, not string"),
    (ReaderOptions(image_column="caption"), r"column 'caption' is string, not binary or struct<bytes: binary>"),
])
def test_a_configured_column_the_table_lacks_fails_indexing(tmp_path, reader, message):
    url = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"key": ["a"], "image": [RED], "caption": ["c"], "tags": [["x"]]}), url)
    with pytest.raises(CorpusError, match=message):
        index_shard(url, reader)


def test_a_reader_of_another_format_is_refused(captioned_tar):
    with pytest.raises(CorpusError, match="a webdataset shard, but the corpus is read as parquet"):
        index_shard(captioned_tar, ReaderOptions(format="parquet"))


# --- LLaVA ----------------------------------------------------------------------------------------

def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


LLAVA = [
    {"id": "a", "image": "coco/a.png", "conversations": _turns(("<image>\nWhat colour?", "Red."), ("Sure?", "Yes."))},
    {"id": "a", "image": "coco/b.jpg", "conversations": _turns(("Describe it.", "A blue square."))},
    {"id": "gone", "image": "coco/missing.png", "conversations": _turns(("What is it?", "Unknown."))},
    {"id": "chat", "conversations": _turns(("Hi", "Hello"))},  # text-only
    {"id": "noconv", "image": "coco/a.png"},
    {"id": 7, "image": "coco/a.png", "conversations": _turns(("Again?", "Red."))},
    {"id": "escape", "image": "../secret.png", "conversations": _turns(("?", "!"))},
    {"id": "a", "image": "coco/a.png", "conversations": _turns(("Third?", "Yes."))},
]


@pytest.fixture
def image_root():
    """Images on another fsspec filesystem than the JSON and the shards."""
    fs = fsspec.filesystem("memory")
    root = "memory://llava-images"
    fs.pipe({f"{root}/coco/a.png": RED, f"{root}/coco/b.jpg": BLUE})
    yield root
    fs.rm(root, recursive=True)


def test_llava_json_packs_into_parquet_shards_the_reader_reads(tmp_path, image_root):
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    records = llava_records(str(tmp_path / "llava.json"))
    assert [r.get("key") for r in records] == ["a", "a#2", "gone", None, None, "7", None, "a#3"]
    assert [r.get("invalid") for r in records][4::2] == ["no conversations list", "image is not a relative file path"]
    groups = plan_llava_shards(records, 3)
    assert [len(g) for g in groups] == [5, 3]  # 3 packed records each (the last 2), the others where they fall
    out = str(tmp_path / "packed")
    counts = [pack_llava_shard(g, image_root, out, f"llava-{i:06d}") for i, g in enumerate(groups)]
    assert counts == [{"records": 3, "missing_image": 1, "text_only": 1, "invalid": 1},
                      {"records": 2, "missing_image": 0, "text_only": 0, "invalid": 1}]
    assert [len(g) for g in plan_llava_shards([LLAVA[3], {"invalid": "x"}], 3)] == [2]  # nothing packed: one group

    cfg = CorpusConfig(source="url", url=str(tmp_path / "llava.json"), format="llava",
                       llava=LlavaConfig(image_root=image_root))
    reader = ReaderOptions.from_config(cfg)
    assert reader == replace(DEFAULT, format="parquet", caption_json_key="caption")
    urls = list_shards(out, "parquet")
    records = [index_shard(u, reader) for u in urls]
    assert [(r.samples, r.unusable) for r in records] == [(3, 1), (2, 0)]
    samples = {s.key: s for r in records for s in iter_record(r)}
    assert list(samples) == ["a", "a#2", "gone", "7", "a#3"]
    assert samples["a"].image == RED and samples["a#2"].image == BLUE and samples["a"].caption is None
    assert samples["gone"].problem == "missing_image"
    assert json.loads(samples["gone"].json)["image"] == "coco/missing.png"
    assert conversation(samples["a"].json) == ([("What colour?", "Red."), ("Sure?", "Yes.")], None)
    assert json.loads(samples["7"].json)["id"] == 7 and json.loads(samples["a#3"].json)["id"] == "a"


def test_llava_records_past_the_sample_limits_are_invalid(tmp_path):
    long = {"id": "long", "image": "x.png", "conversations": _turns(("q", "a" * 500))}
    (tmp_path / "l.json").write_text(json.dumps([long, {**LLAVA[0], "id": "short"}]))
    records = llava_records(str(tmp_path / "l.json"), SampleLimitsConfig(max_json_bytes=300))
    assert records[0] == {"invalid": "json_too_large"} and records[1]["key"] == "short"


@pytest.mark.parametrize("text,message", [('{"id": "a"}', "a JSON dict, not a list of LLaVA records"),
                                          ('[{"id": "a"}, 3]', "record 1 is a JSON int, not an object"),
                                          ('[{"id": ', "not JSON")])
def test_a_llava_file_that_is_not_a_list_of_objects_is_refused(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(CorpusError, match=message):
        llava_records(str(tmp_path / "bad.json"))


# --- the manifest carries the reader ------------------------------------------------------------

def test_shard_records_restore_the_reader_from_the_manifest(tmp_path):
    url = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "image": [RED, BLUE]}), url)
    reader = ReaderOptions(format="parquet", key_column="id", caption_column=None)
    manifest = json.loads(json.dumps(corpus_manifest({"train": [index_shard(url, reader)]}, {}, reader=reader)))
    assert manifest["reader"] == asdict(reader)
    assert set(manifest["splits"]["train"]["shards"][0]) == {"url", "name", "format", "samples", "unusable",
                                                              "bytes", "sha256"}
    [record] = shard_records(manifest, "train")
    assert record.reader == reader and [s.key for s in iter_record(record)] == ["a", "b"]
    assert ShardRecord(**asdict(record)) == record  # a record through asdict (pretokenize's Ray Data rows)
    del manifest["reader"]
    assert shard_records(manifest, "train")[0].reader == DEFAULT


def test_a_manifest_refuses_records_indexed_with_other_options(captioned_tar):
    with pytest.raises(ValueError, match="indexed with other reader options"):
        corpus_manifest({"train": [index_shard(captioned_tar)]}, {}, reader=ReaderOptions())


def test_iter_record_checks_the_digest(tmp_path):
    url = str(tmp_path / "t.parquet")
    pq.write_table(pa.table({"key": ["a"], "image": [RED]}), url)
    record = index_shard(url, ReaderOptions(caption_column=None))
    assert [s.image for s in iter_record(record)] == [RED]
    pq.write_table(pa.table({"key": ["a"], "image": [BLUE]}), url)
    with pytest.raises(SourceChangedError, match="t.parquet changed since the corpus was indexed"):
        iter_record(record)
