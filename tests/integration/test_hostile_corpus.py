"""A hostile corpus through the real pre-tokenize and tokenizer-training stages on local Ray:
bombs, extreme aspect ratios, nested and non-object JSON, traversal and huge keys, empty and cut
tars, malformed Parquet. Each case ends in the quarantine with its reason or is used; the stages
finish within a time limit, the tokenizer actors' memory stays bounded (sampled), nothing is
written outside the output, and the counts reconcile. An all-bad corpus is refused."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenflow import storage
from tokenflow.config import PretokenizeConfig, SampleLimitsConfig, load_config
from tokenflow.data.manifest import corpus_manifest, index_shard
from tokenflow.data.quarantine import QuarantineCeilingExceeded
from tokenflow.data.shapes import write_shapes_corpus
from tokenflow.data.token_shards import iter_token_samples, read_table
from tokenflow.stages.pretokenize import pretokenize_corpus
from tokenflow.stages.train_tokenizer import run_train_tokenizer

from tests.conftest import MODEL_CONFIGS, one_corpus
from tests.fixtures.odd_images import header_only_png, odd_image_samples

PNG = odd_image_samples()["rgb_png"][0]
NESTED = "[" * 100_000 + "]" * 100_000
LIMITS = SampleLimitsConfig(max_image_pixels=4_000_000, max_quarantine_fraction=1.0)
# key -> (image bytes, metadata JSON, the quarantine reason expected, or None when it is used)
CASES = {
    "bomb": (header_only_png(60_000, 60_000), None, "too_large"),
    "strip": (header_only_png(8_000, 2), None, "extreme_aspect"),
    "cut_png": (PNG[: len(PNG) // 2], None, "truncated"),
    "nested_json": (PNG, NESTED, None),  # the image is fine; the JSON is bounded wherever it is read
    "list_json": (PNG, "[1, 2, 3]", None),
    "dotdot": (PNG, None, None),
}


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _hostile(root: Path) -> dict:
    splits = write_shapes_corpus(str(root / "shapes"), num_samples=40, shard_size=10, seed=2)
    with tarfile.open(root / "hostile-000000.tar", "w") as tar:
        for key, (image, meta, _) in CASES.items():
            _member(tar, f"{key}.png", image)
            _member(tar, f"{key}.txt", key.encode())
            if meta is not None:
                _member(tar, f"{key}.json", meta.encode())
    (root / "empty-000000.tar").write_bytes(b"")
    whole = root / "whole.tar"
    with tarfile.open(whole, "w") as tar:
        for i in range(4):
            _member(tar, f"cut{i}.png", PNG)
    with tarfile.open(whole) as tar:
        cut_at = tar.getmembers()[2].offset_data + 7
    (root / "cut-000000.tar").write_bytes(whole.read_bytes()[:cut_at])
    whole.unlink()
    (root / "junk-000000.parquet").write_bytes(b"PAR1" + os.urandom(64))
    keys = ["../../escape", "/abs/key", "nul\x00key", "k" * 1000]
    pq.write_table(pa.table({"key": keys, "image": [PNG] * 4, "caption": keys, "json": [NESTED] * 4}),
                   root / "keys-000000.parquet")
    train = [*splits["train"], *(str(root / n) for n in ("hostile-000000.tar", "empty-000000.tar",
                                                          "cut-000000.tar", "junk-000000.parquet",
                                                          "keys-000000.parquet"))]
    return corpus_manifest({"train": [index_shard(u) for u in train],
                            "heldout": [index_shard(u) for u in splits["heldout"]]}, source={"test": "hostile"})


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


class _ActorMemory(threading.Thread):
    """The peak RSS of the tokenizer actor processes, sampled while the stage runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                if any("_EncoderActor" in part for part in p.info["cmdline"] or []) and p.info["memory_info"]:
                    self.peak = max(self.peak, p.info["memory_info"].rss)


def test_a_hostile_corpus_is_quarantined_or_used_never_a_crash(ray_local, tiny_tokenizer_path, tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    manifest = _hostile(corpus_dir)
    corpus_before = {p: (corpus_dir / p).read_bytes() for p in _files(corpus_dir)}
    outside_before = _files(tmp_path)
    out = tmp_path / "tokens"
    memory = _ActorMemory()
    memory.start()
    start = time.monotonic()
    tokens = pretokenize_corpus(manifest, str(tiny_tokenizer_path), str(out), PretokenizeConfig(micro_batch=4),
                                limits=LIMITS)
    elapsed = time.monotonic() - start
    memory.stop.set()
    memory.join()
    # The 60,000^2 bomb decoded would take 3.6 GB per channel: the budget is checked from its header.
    assert elapsed < 120 and 0 < memory.peak < 2.5 * 2**30, (elapsed, memory.peak)

    quarantine = {r["key"]: r["reason"] for r in read_table(str(out / "_QUARANTINE.parquet")).to_pylist()}
    used = {s.key: s for s in iter_token_samples([str(out / e["path"]) for e in tokens["splits"]["train"]["shards"]])}
    for key, (_, meta, reason) in CASES.items():
        if reason is None:
            assert key in used and key not in quarantine and used[key].json == meta, key
        else:
            assert quarantine[key].startswith(reason), (key, quarantine[key])
    for shard, reason in (("empty-000000.tar", "unreadable_tar"), ("cut-000000.tar", "unreadable_tar"),
                          ("junk-000000.parquet", "unreadable_parquet")):
        assert quarantine[f"{shard}#unreadable"].startswith(reason), shard
    assert {"cut0", "cut1"} <= set(used)  # the samples before the cut are kept
    assert {"../../escape", "/abs/key", "nul\x00key", "k" * 1000} <= set(used)  # keys are data, not paths
    split = tokens["splits"]["train"]
    assert split["rows"] + split["quarantined"] == manifest["splits"]["train"]["samples"]

    # The tokenizer trains on what is usable of the same corpus; its stream quarantines the rest.
    cfg = load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", [
        "train_tokenizer.steps=2", "train_tokenizer.num_workers=1", "train_tokenizer.micro_batch_size=4",
        "train_tokenizer.heldout_images=2", "limits.max_image_pixels=4000000",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    trained = run_train_tokenizer(cfg, one_corpus(manifest), str(tmp_path / "tokenizer"))
    assert trained["steps"] == 2

    assert corpus_before == {p: (corpus_dir / p).read_bytes() for p in _files(corpus_dir)}  # read, never written
    new = {p for p in _files(tmp_path) - outside_before
           if not p.startswith(("tokens/", "tokenizer/", "mlflow.db", "mlruns/"))}
    assert not new, new  # nothing written outside the outputs


def test_an_all_bad_corpus_never_completes(ray_local, tiny_tokenizer_path, tmp_path):
    with tarfile.open(tmp_path / "bad-000000.tar", "w") as tar:
        for i in range(3):
            _member(tar, f"b{i}.png", b"not an image")
    manifest = corpus_manifest({"train": [index_shard(str(tmp_path / "bad-000000.tar"))]}, source={})
    out = tmp_path / "tokens"
    with pytest.raises(QuarantineCeilingExceeded, match=r"3 of 3 samples quarantined .* undecodable x3"):
        pretokenize_corpus(manifest, str(tiny_tokenizer_path), str(out), PretokenizeConfig(micro_batch=4),
                           limits=SampleLimitsConfig(max_quarantine_fraction=1.0))
    assert not storage.exists(str(out / "_MANIFEST.json"))
