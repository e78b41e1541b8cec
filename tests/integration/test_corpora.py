"""A corpus per stage on real engines: LLaVA-style JSON through the corpus stage into token shards
(its missing image quarantined), and a two-corpus generator mixture on Ray Train + DeepSpeed whose
realised proportions, dropped duplicates and lineage land in the stage's manifest and MLflow run."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
from PIL import Image

from tokenflow.config import CorpusConfig, LlavaConfig, PretokenizeConfig, load_config
from tokenflow.data.examples import conversation
from tokenflow.data.stage_data import StageData
from tokenflow.data.token_shards import QUARANTINE_NAME, iter_token_samples
from tokenflow.stages.corpus import build_corpus
from tokenflow.stages.pretokenize import pretokenize_corpus
from tokenflow.stages.train_generator import run_train_generator
from tokenflow.stages.train_tokenizer import _mixture

from tests.conftest import MODEL_CONFIGS
from tests.integration.conftest import TINY_LM, assert_resources_released


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return buf.getvalue()


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [m for q, a in pairs for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def test_llava_json_becomes_token_shards_with_its_conversations(ray_local, tiny_tokenizer_path, tmp_path):
    images = tmp_path / "images" / "coco"
    images.mkdir(parents=True)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    for i, color in enumerate(colors):
        (images / f"{i}.png").write_bytes(_png(color))
    records = [{"id": f"r{i}", "image": f"coco/{i % 4}.png",
                "conversations": _turns(("<image>\nWhat colour is it?", f"Colour {i % 4}."), ("Sure?", "Yes."))}
               for i in range(30)]
    records[3]["image"] = "coco/missing.png"
    records.append({"id": "text", "conversations": _turns(("Hi", "Hello"))})
    (tmp_path / "chat.json").write_text(json.dumps(records))
    cfg = CorpusConfig(source="url", url=str(tmp_path / "chat.json"), format="llava", heldout_shards=1,
                       llava=LlavaConfig(image_root=str(tmp_path / "images"), shard_size=10))
    corpus = build_corpus(cfg, str(tmp_path / "corpus"))
    assert corpus["llava"] == {"records": 30, "missing_image": 1, "text_only": 1, "invalid": 0}
    assert [len(corpus["splits"][s]["shards"]) for s in ("train", "heldout")] == [2, 1]

    out = str(tmp_path / "tokens")
    tokens = pretokenize_corpus(corpus, str(tiny_tokenizer_path), out,
                                PretokenizeConfig(batch_size=8, micro_batch=8, num_actors=1))
    assert_resources_released(ray_local)
    assert tokens["splits"]["train"]["rows"] == 19 and tokens["splits"]["heldout"]["rows"] == 10
    quarantine = pq.read_table(f"{out}/{QUARANTINE_NAME}").to_pylist()
    assert [(q["key"], q["reason"]) for q in quarantine] == [("r3", "missing_image")]
    rows = {s.key: s for s in iter_token_samples(f"{out}/{e['path']}" for e in tokens["splits"]["train"]["shards"])}
    assert conversation(rows["r5"].json)[0] == [("What colour is it?", "Colour 1."), ("Sure?", "Yes.")]


def test_two_corpora_mix_by_weight_without_their_shared_images(ray_local, token_corpus, token_shards,
                                                               tiny_tokenizer_path, tmp_path):
    """Corpus b holds new images and a copy of one of corpus a's training shards: those are
    dropped from b (counted in the manifest), and the generator draws 70/30."""
    b_dir = tmp_path / "b"
    first_a = token_corpus["splits"]["train"]["shards"][0]
    build_corpus(CorpusConfig(shapes={"num_samples": 60, "shard_size": 30, "seed": 7, "heldout_fraction": 0.2}),
                 str(tmp_path / "b-made"))
    shutil.copytree(tmp_path / "b-made" / "data", b_dir)
    shutil.copy(first_a["url"], b_dir / "train" / "copied-000000.tar")
    b_corpus = build_corpus(CorpusConfig(source="url", url=str(b_dir / "train"), heldout_url=str(b_dir / "heldout")),
                            str(tmp_path / "b-corpus"))
    b_tokens = pretokenize_corpus(b_corpus, str(tiny_tokenizer_path), str(tmp_path / "b-tokens"),
                                  PretokenizeConfig(batch_size=32, micro_batch=16, num_actors=1))
    assert_resources_released(ray_local)
    a_manifest, a_url = token_shards
    data = [StageData("a", 0.7, a_manifest, a_url), StageData("b", 0.3, b_tokens, str(tmp_path / "b-tokens"))]

    out = tmp_path / "gen"
    cfg = load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", [
        f"train_generator.{o}" for o in ("steps=5", "micro_batch_size=4", "num_workers=2", "cpus_per_worker=1",
                                         "log_every=5", "checkpoint_every=5", "eval_every=100", "deepspeed=zero2",
                                         f"language_model.architecture={TINY_LM}", "language_model.bpe_vocab_size=400",
                                         "data=[{corpus: a, weight: 0.7}, {corpus: b, weight: 0.3}]")
    ] + ["corpora.a.source=shapes", "corpora.b.source=shapes", "train_tokenizer.data=[{corpus: a}]",
         "train_understanding=null", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}"])
    manifest = run_train_generator(cfg, data, str(tiny_tokenizer_path), str(out))

    rows = {r["corpus"]: r for r in manifest["data"]["train"]}
    copied = first_a["samples"]
    assert rows["b"]["duplicates_dropped"] == copied and rows["a"]["duplicates_dropped"] == 0
    assert rows["b"]["rows"] == b_tokens["splits"]["train"]["rows"]
    # 2 workers x 5 steps x 4 examples, 14 of each worker's 20 from a (the deficit rule is exact).
    assert (rows["a"]["examples"], rows["b"]["examples"]) == (28, 12)
    assert abs(rows["a"]["realised_share"] - 0.7) < 1e-9 and rows["a"]["digest"] != rows["b"]["digest"]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["data/b/share"] == 0.3 and run.data.metrics["data/b/duplicates_dropped"] == copied
    assert run.data.tags["tokenflow.input.tokens.b"] == manifest["inputs"]["tokens.b"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "data/mixture.json", str(tmp_path))).read_text())
    assert [(r["corpus"], r["weight"]) for r in table] == [("a", 0.7), ("b", 0.3)]


def test_the_tokenizer_mixture_drops_images_an_earlier_corpus_holds(tmp_path):
    """The tokenizer reads images, not tokens: its duplicates come from the digests each corpus
    stage wrote beside its manifest. A shard left empty is no part of the mixture; a corpus left
    without rows is refused before training."""
    import pytest

    a = build_corpus(CorpusConfig(shapes={"num_samples": 40, "shard_size": 10, "seed": 3}), str(tmp_path / "a"))
    build_corpus(CorpusConfig(shapes={"num_samples": 20, "shard_size": 10, "seed": 4, "heldout_fraction": 0.0}),
                 str(tmp_path / "new"))
    b_dir = tmp_path / "b-data"
    shutil.copytree(tmp_path / "a" / "data" / "train", b_dir)  # every training image of a again
    for tar in (tmp_path / "new" / "data" / "train").iterdir():
        shutil.copy(tar, b_dir / f"new-{tar.name}")
    b = build_corpus(CorpusConfig(source="url", url=str(b_dir), heldout_shards=1), str(tmp_path / "b"))
    assert (tmp_path / "b" / "_digests" / "train").is_dir()
    a_data, b_data = StageData("a", 1.0, a, str(tmp_path / "a")), StageData("b", 1.0, b, str(tmp_path / "b"))
    sources, dedup = _mixture([a_data, b_data], 2)
    copied = [r for r in b["splits"]["train"]["shards"] if not r["name"].startswith("new-")]
    assert dedup.counts == {"a": 0, "b": sum(r["samples"] for r in copied)}
    assert [r.name for r in sources[1].shards] == [r["name"] for r in b["splits"]["train"]["shards"]
                                                   if r["name"].startswith("new-")]
    only_copies = build_corpus(CorpusConfig(source="url", url=str(b_dir / "shapes-*.tar"), heldout_shards=1),
                               str(tmp_path / "c"))
    with pytest.raises(ValueError, match="corpus 'c': 0 training rows are left"):
        _mixture([a_data, StageData("c", 1.0, only_copies, str(tmp_path / "c"))], 2)
