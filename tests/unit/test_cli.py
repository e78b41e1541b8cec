import json

from tokenflow.cli import main

from tests.conftest import MODEL_CONFIGS


def test_corpus_shapes_writes_shards_and_manifest(tmp_path, capsys):
    assert main(["corpus", "shapes", "--out", str(tmp_path), "--num-samples", "30",
                 "--shard-size", "10", "--seed", "1"]) == 0
    manifest = json.loads((tmp_path / "_MANIFEST.json").read_text())
    splits = manifest["splits"]
    assert splits["train"]["samples"] + splits["heldout"]["samples"] == 30
    assert all(s["sha256"] and s["samples"] <= 10 for b in splits.values() for s in b["shards"])
    assert "train:" in capsys.readouterr().out


def test_config_show_prints_resolved_config_and_hash(capsys):
    assert main(["config", "show", "--config", str(MODEL_CONFIGS / "tokenflow-b.yaml"),
                 "--set", "tokenizer.quantizer.codebook_size=16384"]) == 0
    out = capsys.readouterr().out
    assert "codebook_size: 16384" in out and "# config hash: " in out


def test_bad_config_exits_2_with_the_message(capsys):
    code = main(["config", "show", "--config", str(MODEL_CONFIGS / "tokenflow-tiny.yaml"),
                 "--set", "tokenizer.quantizer.scales=[1, 16]"])
    assert code == 2
    assert "exceed the latent grid" in capsys.readouterr().err


def test_demo_prints_token_counts_and_writes_a_grid(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "130 tokens per image" in out and "scale 8x8:    64 tokens" in out
    assert (tmp_path / "demo_grid.png").stat().st_size > 0
