"""The pre-tokenize stage on a real local Ray instance, over real webdataset/Parquet files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenflow import storage
from tokenflow.config import PretokenizeConfig, SampleLimitsConfig
from tokenflow.data.manifest import corpus_manifest, index_shard, shard_records
from tokenflow.data.quarantine import QuarantineCeilingExceeded
from tokenflow.data.shard_encoder import ShardEncoder
from tokenflow.data.shapes import write_shapes_corpus
from tokenflow.data.token_shards import iter_token_samples, read_table
from tokenflow.data.verify import verify_token_shards
from tokenflow.models.weights import file_sha256
from tokenflow.stages.pretokenize import encode_corpus, pretokenize_corpus

from tests.conftest import MODEL_CONFIGS, REPO
from tests.integration.conftest import ProcessKiller, assert_resources_released
from tests.fixtures.odd_images import odd_image_samples

_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "tiff": "tif"}


def _ext(case: str) -> str:
    return next((e for k, e in _EXT.items() if k in case), "jpg")


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _file_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


BROKEN_ON_PURPOSE = SampleLimitsConfig(max_quarantine_fraction=1.0)  # test corpora with many bad samples


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory) -> dict:
    """Shapes shards plus an odd-formats webdataset shard, a cut-off tar and a Parquet shard."""
    root = tmp_path_factory.mktemp("corpus")
    splits = write_shapes_corpus(str(root / "shapes"), num_samples=40, shard_size=12, seed=0)
    members = []
    for case, (data, _) in sorted(odd_image_samples().items()):
        members += [(f"odd-{case}.{_ext(case)}", data), (f"odd-{case}.txt", case.encode())]
    members.append(("odd-caption_only.txt", b"no image here"))
    _write_tar(root / "odd-000000.tar", members)
    whole = root / "whole.tar"
    _write_tar(whole, [(f"cut-{i}.png", odd_image_samples()["rgb_png"][0]) for i in range(6)])
    with tarfile.open(whole) as tar:
        cut_at = tar.getmembers()[3].offset_data + 10  # inside the 4th image's bytes
    (root / "cut-000000.tar").write_bytes(whole.read_bytes()[:cut_at])
    whole.unlink()
    train = [*splits["train"], str(root / "odd-000000.tar"), str(root / "cut-000000.tar")]
    return corpus_manifest({"train": [index_shard(u) for u in train],
                            "heldout": [index_shard(u) for u in splits["heldout"]]},
                           source={"test": "mixed"})


def test_odd_formats_tokenized_broken_quarantined_counts_reconcile(ray_local, mixed_corpus,
                                                                   tiny_tokenizer_path, tmp_path):
    out = str(tmp_path / "tokens")
    cfg = PretokenizeConfig(batch_size=8, micro_batch=4, num_actors=2, cpus_per_actor=1)
    limits = SampleLimitsConfig(max_image_pixels=4_000_000)
    refused = r"of \d+ samples quarantined \(\d+\.\d%, limits.max_quarantine_fraction is 5.0%\); most frequent: \w+ x\d"
    with pytest.raises(QuarantineCeilingExceeded, match=refused):
        pretokenize_corpus(mixed_corpus, str(tiny_tokenizer_path), out, cfg, limits=limits)
    assert not storage.exists(storage.join(out, "_MANIFEST.json"))  # refused, the quarantine kept for a look
    assert read_table(storage.join(out, "_QUARANTINE.parquet")).num_rows > 0
    # The mixed corpus is broken on purpose: with the ceiling lifted the same shards complete.
    manifest = pretokenize_corpus(mixed_corpus, str(tiny_tokenizer_path), out, cfg,
                                  limits=limits.model_copy(update={"max_quarantine_fraction": 1.0}))
    assert_resources_released(ray_local)
    assert verify_token_shards(out) == []

    odd = next(e for e in manifest["splits"]["train"]["shards"] if e["source"] == "odd-000000.tar")
    tokens = {s.key: s for s in iter_token_samples([storage.join(out, odd["path"])])}
    quarantine = {r["key"]: r for r in read_table(storage.join(out, "_QUARANTINE.parquet")).to_pylist()}
    for case, (_, reason) in odd_image_samples().items():
        key = f"odd-{case}"
        if reason is None:
            assert key in tokens and key not in quarantine, case
            assert tokens[key].tokens.shape == (130,) and tokens[key].caption == case
        else:
            assert key not in tokens, case
            assert quarantine[key]["reason"].startswith(reason), (case, quarantine[key]["reason"])
    assert quarantine["odd-caption_only"]["reason"] == "missing_image"
    assert any(r["reason"].startswith("unreadable_tar") and r["shard"] == "cut-000000.tar"
               for r in quarantine.values())

    corpus_total = sum(b["samples"] for b in mixed_corpus["splits"].values())
    out_total = sum(b["rows"] + b["quarantined"] for b in manifest["splits"].values())
    assert out_total == corpus_total == manifest["quarantine"]["rows"] + sum(
        b["rows"] for b in manifest["splits"].values())
    heldout = manifest["splits"]["heldout"]
    assert heldout["rows"] == mixed_corpus["splits"]["heldout"]["samples"] and heldout["quarantined"] == 0


def test_parquet_corpus_and_carried_fields(ray_local, tiny_tokenizer_path, tmp_path):
    png = odd_image_samples()["rgb_png"][0]
    table = pa.table({"key": ["a", "b", "c", "a"], "image": [png, None, png, png],
                      "caption": ["first", "second", None, "dup"], "json": ['{"x": 1}', None, None, None]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    corpus = corpus_manifest({"train": [index_shard(str(tmp_path / "part-0.parquet"))]}, source={})
    out = str(tmp_path / "tokens")
    pretokenize_corpus(corpus, str(tiny_tokenizer_path), out, PretokenizeConfig(micro_batch=2),
                       limits=BROKEN_ON_PURPOSE)  # 2 of 4 rows
    assert verify_token_shards(out) == []
    samples = list(iter_token_samples([f"{out}/shards/train/part-0.parquet"]))
    assert [(s.key, s.caption, s.json) for s in samples] == [("a", "first", '{"x": 1}'), ("c", None, None)]
    assert np.array_equal(samples[0].tokens, samples[1].tokens)  # same bytes, same tokens
    reasons = sorted(r["reason"] for r in read_table(f"{out}/_QUARANTINE.parquet").to_pylist())
    assert reasons == ["duplicate_key", "missing_image"]


def test_tokens_do_not_depend_on_batch_size(ray_local, mixed_corpus, tiny_tokenizer_path, tmp_path):
    trees = []
    for batch_size in (3, 16):
        out = tmp_path / f"bs{batch_size}"
        pretokenize_corpus(mixed_corpus, str(tiny_tokenizer_path), str(out),
                           PretokenizeConfig(batch_size=batch_size, micro_batch=4), limits=BROKEN_ON_PURPOSE)
        trees.append(_file_tree(out))
    assert trees[0] == trees[1]


def test_decoding_threads_keep_every_row_in_order(mixed_corpus, tiny_tokenizer_path, tmp_path):
    """Shards decoded by 3 threads, overlapped with encoding, give the bytes of 1 thread's."""
    trees = []
    for threads in (1, 3):
        out = tmp_path / f"threads{threads}"
        encoder = ShardEncoder(str(tiny_tokenizer_path), str(out), batch_size=3, micro_batch=4,
                               limits=BROKEN_ON_PURPOSE, decode_threads=threads)
        for split in mixed_corpus["splits"]:
            for record in shard_records(mixed_corpus, split):
                encoder.encode_shard(record, split)
        trees.append(_file_tree(out))
    assert trees[0] == trees[1]


def test_rerun_skips_finished_shards_and_refuses_foreign_outputs(ray_local, mixed_corpus,
                                                                  tiny_tokenizer_path, tmp_path, tiny_config):
    out = tmp_path / "tokens"
    cfg = PretokenizeConfig(micro_batch=4)
    pretokenize_corpus(mixed_corpus, str(tiny_tokenizer_path), str(out), cfg, limits=BROKEN_ON_PURPOSE)
    before = _file_tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.parquet")}
    pretokenize_corpus(mixed_corpus, str(tiny_tokenizer_path), str(out), cfg, limits=BROKEN_ON_PURPOSE)
    assert _file_tree(out) == before
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.parquet")}
    # Every shard written: the driver starts no actor (one would fail loading this absent export).
    manifest, per_node = encode_corpus(mixed_corpus, str(tmp_path / "absent.safetensors"),
                                       file_sha256(tiny_tokenizer_path), str(out), cfg, limits=BROKEN_ON_PURPOSE)
    assert per_node == {} and manifest["splits"] == json.loads((out / "_MANIFEST.json").read_text())["splits"]

    import torch
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.models.weights import save_tokenizer

    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_tokenizer(TokenFlowTokenizer(tiny_config, with_teacher=False), other)
    with pytest.raises(Exception, match="made from other inputs"):
        pretokenize_corpus(mixed_corpus, str(other), str(out), cfg, limits=BROKEN_ON_PURPOSE)


def test_verify_catches_a_tampered_shard(ray_local, mixed_corpus, tiny_tokenizer_path, tmp_path):
    out = tmp_path / "tokens"
    pretokenize_corpus(mixed_corpus, str(tiny_tokenizer_path), str(out), PretokenizeConfig(micro_batch=4),
                       limits=BROKEN_ON_PURPOSE)
    shard = sorted((out / "shards" / "train").glob("shapes-*.parquet"))[0]
    table = pq.read_table(shard)
    tokens = table.column("tokens").to_pylist()
    tokens[0][5] = (tokens[0][5] + 1) % 512
    pq.write_table(table.set_column(1, table.schema.field("tokens"),
                                    pa.array(tokens, table.schema.field("tokens").type)), shard)
    problems = verify_token_shards(str(out))
    assert any(shard.stem in p and "content differs" in p for p in problems), problems
    cli = subprocess.run([sys.executable, "-m", "tokenflow.cli", "shards", "verify", str(out)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "content differs" in cli.stderr


def _pretokenize_cmd(corpus_dir: Path, tokenizer: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "pretokenize.py"),
            "--config", str(MODEL_CONFIGS / "tokenflow-tiny.yaml"),
            "--set", "pretokenize.micro_batch=4", "--set", "pretokenize.batch_size=4",
            "--corpus", str(corpus_dir), "--tokenizer", str(tokenizer), "--out", str(out)]


def test_the_entry_point_writes_verified_shards(tiny_tokenizer_path, tmp_path):
    """pipelines/pretokenize.py as a user runs it: a fresh driver on its own local Ray writes a
    manifest and shards that verify. (A driver killed mid-stage, then re-run, is
    tests/integration/test_pipeline_kill.py, through the pipeline.)"""
    from tokenflow.config import CorpusConfig, ShapesCorpusConfig
    from tokenflow.stages.corpus import build_corpus

    corpus_dir, out = tmp_path / "corpus", tmp_path / "tokens"
    build_corpus(CorpusConfig(shapes=ShapesCorpusConfig(num_samples=48, shard_size=12, seed=3)), str(corpus_dir))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local"}
    subprocess.run(_pretokenize_cmd(corpus_dir, tiny_tokenizer_path, out), env=env, check=True, capture_output=True)
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert sum(split["rows"] for split in manifest["splits"].values()) == 48
    assert verify_token_shards(str(out)) == []


def test_a_tokenizer_view_makes_its_own_token_shards(ray_local, tmp_path, tiny_tokenizer_path):
    """The generation view (here 72 px with a 9x9 last scale, as TokenFlow-B at 256 px): every
    shard holds the view's token count, the manifest names the view, and the encoding identity
    differs from the trained view's."""
    import torch

    from tokenflow.config import TokenizerView
    from tokenflow.models.weights import load_tokenizer

    splits = write_shapes_corpus(str(tmp_path / "corpus"), num_samples=24, shard_size=12, seed=1)
    manifest = corpus_manifest({n: [index_shard(u) for u in urls] for n, urls in splits.items()}, {"kind": "shapes"})
    cfg = PretokenizeConfig(batch_size=8, micro_batch=4, num_actors=1)
    view = TokenizerView(image_size=72, scales=(1, 2, 3, 4, 6, 8, 9))
    viewed = pretokenize_corpus(manifest, str(tiny_tokenizer_path), str(tmp_path / "view"), cfg, view)
    plain = pretokenize_corpus(manifest, str(tiny_tokenizer_path), str(tmp_path / "plain"), cfg)
    assert viewed["scales"] == [1, 2, 3, 4, 6, 8, 9] and plain["scales"] == [1, 2, 3, 4, 6, 8]
    assert viewed["tokenizer_view"] == {"image_size": 72, "scales": [1, 2, 3, 4, 6, 8, 9]}
    assert plain["tokenizer_view"] is None and viewed["encoding_hash"] != plain["encoding_hash"]
    samples = list(iter_token_samples([str(tmp_path / "view" / e["path"]) for e in viewed["splits"]["train"]["shards"]]))
    assert len(samples) == viewed["splits"]["train"]["rows"] and all(s.tokens.shape == (211,) for s in samples)
    tokens = torch.from_numpy(np.stack([s.tokens for s in samples[:2]])).long()
    decoded = load_tokenizer(tiny_tokenizer_path, view=view).decode_indices(tokens)
    assert decoded.shape == (2, 3, 72, 72)


def test_every_attempt_losing_its_actor_fails_naming_the_loss(ray_local, tiny_tokenizer_path, tmp_path):
    """No restarts, no task retries, two attempts: each attempt's tokenizer actor SIGKILLed while
    it encodes, and the stage fails with an error naming the attempts and the lost actor (it
    neither hangs nor retries without bound); the shards it had written stay valid."""
    from tokenflow.config import CorpusConfig, ShapesCorpusConfig
    from tokenflow.stages.corpus import build_corpus
    from tokenflow.stages.pretokenize import PretokenizeAttemptsExhausted

    corpus = build_corpus(CorpusConfig(shapes=ShapesCorpusConfig(num_samples=240, shard_size=20, seed=3)),
                          str(tmp_path / "corpus"))
    out = tmp_path / "tokens"
    first = ProcessKiller("_EncoderActor", lambda: bool(list(out.rglob("*.parquet"))))

    def next_actor_started() -> bool:
        return first.killed is not None and any(
            p.pid > first.killed and any("_EncoderActor" in part for part in p.info["cmdline"] or [])
            for p in psutil.process_iter(["cmdline"]))

    second = ProcessKiller("_EncoderActor", next_actor_started)
    first.start()
    second.start()
    cfg = PretokenizeConfig(micro_batch=4, batch_size=4, max_actor_restarts=0, max_task_retries=0, max_attempts=2,
                            retry_wait_s=0)
    with pytest.raises(PretokenizeAttemptsExhausted, match=r"in each of 2 attempts .*the last loss: \w*Actor\w*Error"):
        pretokenize_corpus(corpus, str(tiny_tokenizer_path), str(out), cfg)
    first.join()
    second.join()
    assert first.killed is not None and second.killed is not None and first.killed != second.killed
    assert not (out / "_MANIFEST.json").exists()
    assert_resources_released(ray_local)
