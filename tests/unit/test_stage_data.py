"""A corpus per stage: the config's corpora and mixtures, what validation rejects before any
cluster work, the per-corpus stages of the DAG, and cross-corpus deduplication."""

from __future__ import annotations

import hashlib

import pytest

from tokenflow.config import ConfigError, load_config
from tokenflow.data.dedup import find_duplicates
from tokenflow.workflow.pipeline import stages

from tests.conftest import REPO

PIPELINES = REPO / "configs" / "pipelines"
SMOKE = PIPELINES / "smoke.yaml"
TWO = ["corpora.extra.source=url", "corpora.extra.url=/data/extra/", "corpora.extra.texts=[captions]"]


def test_the_smoke_config_names_its_one_corpus_for_every_stage():
    cfg = load_config(SMOKE)
    assert list(cfg.corpora) == ["shapes"]
    assert {s: [e.corpus for e in cfg.stage_data(s)] for s in cfg.training_sections} == {
        "train_tokenizer": ["shapes"], "train_generator": ["shapes"], "train_understanding": ["shapes"]}
    names = [s.name for s in stages(cfg)]
    assert names[0] == "corpus.shapes" and "pretokenize.shapes" in names
    assert not any(n.startswith("pretokenize_generation") for n in names)


def test_the_b_config_trains_each_stage_on_its_own_corpora():
    cfg = load_config(PIPELINES / "tokenflow-b.yaml")
    gen = cfg.stage_data("train_generator")
    assert [(e.corpus, e.weight) for e in gen] == [("laion-aesthetics", 0.7), ("cc12m", 0.3)]
    assert cfg.corpora["llava-instruct"].format == "llava" and cfg.corpora["imagenet"].holds == frozenset()
    specs = {s.name: s for s in stages(cfg)}
    assert specs["train_tokenizer"].inputs == ("corpus.imagenet",)
    assert specs["train_generator"].inputs == ("pretokenize_generation.laion-aesthetics",
                                               "pretokenize_generation.cc12m", "train_tokenizer")
    assert specs["train_understanding"].inputs == ("pretokenize.llava-pretrain", "pretokenize.llava-instruct",
                                                   "train_tokenizer")
    assert "pretokenize.imagenet" not in specs  # the tokenizer reads images, never tokens
    assert specs["eval_reconstruction"].inputs[0] == "corpus.imagenet"


def test_a_corpus_shared_by_two_llm_stages_is_pre_tokenized_once():
    cfg = load_config(SMOKE, TWO + ["train_generator.data=[{corpus: shapes}, {corpus: extra, weight: 0.5}]"])
    names = [s.name for s in stages(cfg)]
    assert names.count("pretokenize.shapes") == 1 and "pretokenize.extra" in names
    assert next(s for s in stages(cfg) if s.name == "train_understanding").inputs == ("pretokenize.shapes",
                                                                                      "train_tokenizer")


def test_a_mixture_changes_only_the_stages_that_read_it(tmp_path):
    """The mixture weights are part of the training stage's identity, not of the corpora's."""
    from tokenflow.workflow.runner import plan

    extra = ["corpora.extra.source=shapes", "corpora.extra.shapes.seed=1", "train_tokenizer.data=[{corpus: shapes}]",
             "train_understanding.data=[{corpus: shapes}]"]
    a = {p.name: p for p in plan(load_config(SMOKE, extra + [
        "train_generator.data=[{corpus: shapes}, {corpus: extra, weight: 0.5}]"]), str(tmp_path))}
    b = {p.name: p for p in plan(load_config(SMOKE, extra + [
        "train_generator.data=[{corpus: shapes}, {corpus: extra, weight: 0.25}]"]), str(tmp_path))}
    for corpus in ("corpus.shapes", "corpus.extra"):
        assert a[corpus].identity.hash == b[corpus].identity.hash
    # The weights are inside the generator's section (its identity), not the tokenizer's.
    assert "train_generator" in a["train_generator"].spec.config
    assert not any(c.startswith("train_generator") for c in a["train_tokenizer"].spec.config)


@pytest.mark.parametrize("overrides, message", [
    (TWO + ["corpora.extra.texts=[]", "train_generator.data=[{corpus: extra}]"],
     "corpus 'extra' holds no text; this stage trains on captions"),
    (TWO + ["train_understanding.data=[{corpus: extra}]"],
     "corpus 'extra' holds ['captions']; this stage trains on conversations"),
    (["train_generator.data=[{corpus: laion}]"], "no corpus 'laion' in corpora"),
    (["train_generator.data=[{corpus: shapes}, {corpus: shapes}]"], "corpora named more than once: ['shapes']"),
    (["train_generator.data=[]"], "names no corpus"),
    (["train_generator.data=[{corpus: shapes, weight: 0}]"], "greater than 0"),
    (TWO + ["train_tokenizer.data=null"], "train_tokenizer.data: name the corpora it trains on (2 are defined: extra, shapes)"),
    (["eval.corpus=laion"], "eval.corpus: no corpus 'laion'"),
    (TWO + ["eval.corpus=extra", "train_understanding=null"],
     "eval.generation, eval.dpg: benchmark shapes builds its set from the scene records of the held-out split "
     "of eval.corpus 'extra', which holds ['captions']"),
    (["corpora.shapes.format=llava"], "format llava needs the llava section"),
    (["corpora.Bad Name.source=shapes", "train_tokenizer.data=[{corpus: shapes}]", "train_generator.data=[{corpus: shapes}]",
      "train_understanding.data=[{corpus: shapes}]"], "must match"),
])
def test_a_stage_without_suitable_data_is_rejected_at_validation(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert message in str(err.value)


def test_shapes_benchmarks_run_on_a_corpus_declared_to_carry_scenes_or_not_at_all():
    indexed = TWO + ["eval.corpus=extra", "corpora.extra.texts=[captions, scenes]"]
    assert load_config(SMOKE, indexed).eval_corpus == "extra"  # e.g. a shapes corpus written to a bucket
    no_llm = ["train_generator=null", "train_understanding=null"]  # reconstruction reads images only
    assert load_config(SMOKE, TWO + ["eval.corpus=extra"] + no_llm).eval_corpus == "extra"


def test_llava_json_gives_the_understanding_model_conversations_and_no_captions():
    cfg = load_config(SMOKE, ["corpora.chat.source=url", "corpora.chat.format=llava", "corpora.chat.url=/d/chat.json",
                              "corpora.chat.llava.image_root=/d/images", "train_tokenizer.data=[{corpus: shapes}]",
                              "train_generator.data=[{corpus: shapes}]",
                              "train_understanding.data=[{corpus: chat}]"])
    assert cfg.corpora["chat"].holds == frozenset({"conversations"})
    assert [e.corpus for e in cfg.stage_data("train_understanding.align")] == ["chat"]  # align_data: None -> data
    with pytest.raises(ConfigError, match="corpus 'chat' holds \\['conversations'\\]; this stage trains on captions"):
        load_config(SMOKE, ["corpora.chat.source=url", "corpora.chat.format=llava", "corpora.chat.url=/d/chat.json",
                            "corpora.chat.llava.image_root=/d/images", "train_tokenizer.data=[{corpus: shapes}]",
                            "train_generator.data=[{corpus: chat}]", "train_understanding.data=[{corpus: shapes}]"])


def _digest(image: str) -> str:
    return hashlib.sha256(image.encode()).hexdigest()


def test_duplicates_across_corpora_are_dropped_from_the_later_corpus_and_counted():
    shards = {"a0": [("a1", "x"), ("a2", "y"), ("a3", "y")],  # y twice inside corpus a: kept, counted
              "b0": [("b1", "x"), ("b2", "z")], "b1": [("b3", "y"), ("b4", "w")],
              "c0": [("c1", "z"), ("c2", "v")]}
    rows = lambda shard: [(key, _digest(image)) for key, image in shards[shard]]  # noqa: E731
    dup = find_duplicates([("a", ["a0"]), ("b", ["b0", "b1"]), ("c", ["c0"])], rows)
    assert dup.dropped == {"a": {}, "b": {"b0": frozenset({"b1"}), "b1": frozenset({"b3"})},
                           "c": {"c0": frozenset({"c1"})}}
    assert dup.report() == {"a": {"dropped": 0, "within_corpus": 1}, "b": {"dropped": 2, "within_corpus": 0},
                            "c": {"dropped": 1, "within_corpus": 0}}
    # The mixture order decides which copy stays: deterministic, whatever the shard contents' order.
    swapped = find_duplicates([("c", ["c0"]), ("b", ["b0", "b1"]), ("a", ["a0"])], rows)
    assert swapped.dropped["b"] == {"b0": frozenset({"b2"})} and swapped.counts == {"c": 0, "b": 1, "a": 3}


def test_duplicates_match_a_plain_reading_of_the_rule_on_random_corpora():
    """First occurrence wins across corpora (mixture, shard, row order); repeats inside a corpus
    are counted, not dropped: checked against a direct set-based reading on random data, with
    digests that share their leading bytes."""
    import random

    rng = random.Random(0)
    pool = [_digest(str(i)) for i in range(300)]
    pool += ["ab" * 8 + digest[16:] for digest in pool[:20]]  # sharing their first 8 bytes
    shards = {f"{c}{s}": [(f"{c}{s}-{r}", rng.choice(pool)) for r in range(rng.randrange(0, 40))]
              for c in "abc" for s in range(rng.randrange(1, 30))}
    corpora = [(c, [s for s in shards if s[0] == c]) for c in "abc"]
    dup = find_duplicates(corpora, shards.__getitem__)

    earlier: set[str] = set()
    for name, names in corpora:
        mine: set[str] = set()
        dropped, within = {}, 0
        for shard in names:
            keys = set()
            for key, digest in shards[shard]:
                if digest in earlier:
                    keys.add(key)
                elif digest in mine:
                    within += 1
                mine.add(digest)
            if keys:
                dropped[shard] = frozenset(keys)
        earlier |= mine
        assert dup.dropped[name] == dropped and dup.counts[name] == sum(map(len, dropped.values())), name
        assert dup.within[name] == within, name
    assert sum(dup.counts.values()) > 0 and sum(dup.within.values()) > 0


def test_a_single_corpus_is_not_read_for_duplicates():
    assert find_duplicates([("a", ["a0"])], lambda shard: pytest.fail("read")).dropped == {}


def test_a_row_without_an_image_digest_is_an_error_naming_it():
    with pytest.raises(ValueError, match="a0: sample 'k' has no sha256 image digest"):
        find_duplicates([("a", ["a0"]), ("b", [])], lambda shard: [("k", None)])
    good = _digest("an image")
    for bad in ("z" * 64, "  " + good[:62], good.encode(), 7):  # fromhex would skip the spaces
        with pytest.raises(ValueError, match="a0: sample 'k' has no sha256 image digest"):
            find_duplicates([("a", ["a0"]), ("b", [])], lambda shard: [("j", good), ("k", bad)])


def test_a_bad_shard_fails_without_waiting_for_the_reads_ahead_of_it():
    import threading
    import time

    release = threading.Event()

    def rows(shard: str) -> list[tuple[str, str]]:
        if shard == "a0":
            return [("k", None)]
        release.wait(60)  # a slow object store
        return []

    started = time.monotonic()
    with pytest.raises(ValueError, match="a0: sample 'k'"):
        find_duplicates([("a", ["a0", "a1", "a2"]), ("b", ["b0"])], rows)
    assert time.monotonic() - started < 30
    release.set()


def test_the_data_docs_config_snippets_validate(tmp_path):
    """docs/data.md's snippets for plugging in data are runnable configs (on top of smoke.yaml)."""
    import re

    text = (REPO / "docs" / "data.md").read_text()
    snippets = [s for s in re.findall(r"```yaml\n(.*?)```", text, re.S) if s.startswith("include: smoke.yaml")]
    assert len(snippets) == 3
    for i, snippet in enumerate(snippets):
        path = tmp_path / f"snippet{i}.yaml"
        path.write_text(snippet.replace("include: smoke.yaml", f"include: {SMOKE}"))
        cfg = load_config(path)
        assert len(cfg.corpora) >= 2 and any(len(cfg.stage_data(s)) >= 1 for s in cfg.training_sections)


def test_pairs_dedup_keeps_new_text_about_an_image_and_images_dedup_does_not(tmp_path):
    import numpy as np

    from tokenflow.data.dedup import token_shard_digests
    from tokenflow.data.token_shards import TokenShardInfo, build_token_table, parquet_bytes

    info = TokenShardInfo((1, 2), 16, "t", "e", "s", "x")
    digest = _digest("one image")

    def shard(name: str, texts: list[str]) -> str:
        table = build_token_table([f"{name}{i}" for i in range(len(texts))], np.zeros((len(texts), 5), dtype=np.int64),
                                  texts, [None] * len(texts), [digest] * len(texts), info)
        (tmp_path / f"{name}.parquet").write_bytes(parquet_bytes(table))
        return str(tmp_path / f"{name}.parquet")

    a, b = shard("a", ["a red circle"]), shard("b", ["a red circle", "one circle, red"])
    by_image = find_duplicates([("a", [a]), ("b", [b])], token_shard_digests)
    by_pair = find_duplicates([("a", [a]), ("b", [b])], lambda url: token_shard_digests(url, pairs=True))
    assert by_image.counts["b"] == 2 and by_pair.dropped["b"] == {b: frozenset({"b0"})}


def test_the_unigram_baseline_counts_only_the_rows_training_reads(tmp_path):
    """Rows deduplication dropped from a later corpus do not shape the no-input loss baseline."""
    import math

    import numpy as np

    from tokenflow.data.token_shards import TokenShardInfo, build_token_table, parquet_bytes
    from tokenflow.stages.llm_stage import unigram_entropy
    from tokenflow.train.mixture import MixtureSource

    info = TokenShardInfo((1, 2), 16, "t", "e", "s", "x")
    url = str(tmp_path / "b.parquet")
    tokens = np.array([[0] * 5, [1] * 5])  # b0 all token 0, b1 all token 1
    table = build_token_table(["b0", "b1"], tokens, [None, None], [None, None], ["d0", "d1"], info)
    (tmp_path / "b.parquet").write_bytes(parquet_bytes(table))
    assert math.isclose(unigram_entropy([MixtureSource("b", 1.0, [url])], 16), math.log(2))
    assert unigram_entropy([MixtureSource("b", 1.0, [url], {url: frozenset({"b1"})})], 16) == 0.0


def test_shards_deduplication_emptied_leave_the_mixture_and_an_emptied_corpus_is_refused():
    from tokenflow.train.mixture import MixtureSource, shares_of, without_emptied

    rows = {"s0": 3, "s1": 2}.__getitem__
    source = MixtureSource("b", 1.0, ["s0", "s1"], {"s1": frozenset({"k1", "k2"}), "s0": frozenset({"k3"})})
    assert without_emptied(source, rows, 2).shards == ["s0"]
    with pytest.raises(ValueError, match="corpus 'b': 2 training rows are left .* at least 3 \\(one per worker\\)"):
        without_emptied(source, rows, 3)
    weights = [MixtureSource("a", 0.7, []), MixtureSource("b", 0.2, []), MixtureSource("c", 0.1, [])]
    assert shares_of(8, weights) == [6, 1, 1] and sum(shares_of(64, weights)) == 64


def test_what_a_corpus_carries_is_no_part_of_its_identity_but_llava_packing_limits_are():
    specs = {s.name: s for s in stages(load_config(SMOKE))}
    assert "corpora.shapes.texts" in specs["corpus.shapes"].exclude and "limits" not in specs["corpus.shapes"].config
    llava = load_config(SMOKE, ["corpora.chat.source=url", "corpora.chat.format=llava", "corpora.chat.url=/d/c.json",
                                "corpora.chat.llava.image_root=/d/images", "train_understanding.data=[{corpus: chat}]"])
    assert "limits" in {s.name: s for s in stages(llava)}["corpus.chat"].config
    with pytest.raises(ConfigError, match="dedup pairs: the tokenizer reads images only"):
        load_config(SMOKE, ["train_tokenizer.dedup=pairs"])
    with pytest.raises(ConfigError, match="not heldout_url"):
        load_config(SMOKE, ["corpora.chat.source=url", "corpora.chat.format=llava", "corpora.chat.url=/d/c.json",
                            "corpora.chat.llava.image_root=/d/i", "corpora.chat.heldout_url=/d/h.json"])


def test_a_corpus_indexed_in_place_is_indexed_again_the_same(tmp_path):
    """The corpus stage's own files (_MANIFEST.json, _digests/) beside the shards are no shards."""
    from tokenflow.config import CorpusConfig
    from tokenflow.data.shapes import write_shapes_corpus
    from tokenflow.stages.corpus import build_corpus

    write_shapes_corpus(str(tmp_path), num_samples=30, shard_size=10, seed=0, heldout_fraction=0.0)
    cfg = CorpusConfig(source="url", url=str(tmp_path / "train"), heldout_shards=1)
    first = build_corpus(cfg, str(tmp_path / "train"))
    assert (tmp_path / "train" / "_digests" / "train").is_dir()
    assert build_corpus(cfg, str(tmp_path / "train"))["splits"] == first["splits"]
