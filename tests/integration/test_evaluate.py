"""The eval stages on a real shapes corpus, tiny model exports and a local MLflow store (no Ray)."""

from __future__ import annotations

import json

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tokenflow.config import ConfigError, load_config
from tokenflow.data.corpus import iter_shard
from tokenflow.eval import runners
from tokenflow.eval.dpg import load_dpg, score_dpg, split_grid
from tokenflow.models.tokenizer import TokenFlowTokenizer
from tokenflow.models.weights import save_tokenizer
from tokenflow.seeding import seed_for
from tokenflow.stages.eval_dpg import run_eval_dpg
from tokenflow.stages.eval_generation import run_eval_generation
from tokenflow.stages.eval_pope import run_eval_pope
from tokenflow.stages.eval_reconstruction import run_eval_reconstruction
from tokenflow.stages.eval_understanding import run_eval_understanding

from tests.conftest import MODEL_CONFIGS
from tests.integration.conftest import eval_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the fixtures are in conftest.py


def _finished_run(out, manifest: dict, stage: str):
    """The stage's MLflow client and run, after checking the manifest against the outputs."""
    assert json.loads((out / "_MANIFEST.json").read_text()) == manifest
    assert manifest["kind"] == stage and manifest["results"] == "results.parquet"
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["tokenflow.stage"] == stage
    metrics = dict(run.data.metrics)
    assert metrics.pop("stage_seconds") > 0  # every stage run records its duration
    assert metrics == pytest.approx(manifest["metrics"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"results.parquet", "results_table.json",
                                                                         "grids"}
    return client, run


def test_eval_reconstruction(corpus, tiny_tokenizer_path, tmp_path):
    out = tmp_path / "recon"
    manifest = run_eval_reconstruction(eval_config(out), corpus, str(tiny_tokenizer_path), str(out))
    client, run = _finished_run(out, manifest, "eval_reconstruction")
    heldout = corpus["splits"]["heldout"]["samples"]
    m = manifest["metrics"]
    assert m["num_images"] == heldout - 2 and m["undecodable_images"] == 2
    for key in ("psnr", "ssim", "codebook/usage", "codebook/perplexity"):
        assert key in m and f"baseline/{key}" in m
    assert "rfid" not in m and manifest["skipped"] == {"rfid": "eval.reconstruction.fid.inception_weights is not set"}
    assert run.data.tags["tokenflow.skipped.rfid"] == manifest["skipped"]["rfid"]
    assert manifest["inputs"]["tokenizer"] == run.data.params["input.tokenizer"]

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == heldout
    errors = {r["key"]: r["error"] for r in table if r["error"]}
    assert errors == {"garbage": "undecodable", "no-image": "missing_image"}
    assert all(r["psnr"] is None for r in table if r["error"])
    assert sum(r["psnr"] for r in table if not r["error"]) / m["num_images"] == pytest.approx(m["psnr"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "grids")] == ["grids/reconstructions.png"]


def test_an_evaluation_that_fails_as_a_whole_is_not_recorded(corpus, exports, tiny_tokenizer_path, tmp_path,
                                                             monkeypatch):
    """Every prompt failing is the evaluation failing: the stage raises, its run is FAILED and no
    manifest marks it complete, so the next run evaluates again (a score of 0 is never cached)."""
    real = runners.sample_prompt_images

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(runners, "sample_prompt_images", broken)
    out = tmp_path / "gen"
    with pytest.raises(runners.EvaluationError, match="CUDA out of memory"):
        run_eval_generation(eval_config(out), corpus, exports[0], str(tiny_tokenizer_path), str(out))
    assert not (out / "_MANIFEST.json").exists()
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]
    monkeypatch.setattr(runners, "sample_prompt_images", real)
    manifest = run_eval_generation(eval_config(out), corpus, exports[0], str(tiny_tokenizer_path), str(out))
    assert manifest["metrics"]["failed_generations"] == 0


def test_eval_generation_scores_a_failed_generation_as_zero(corpus, exports, tiny_tokenizer_path, tmp_path,
                                                            monkeypatch):
    """Prompts are sampled in batches; a batch that raises is retried prompt by prompt and only
    the prompt that fails alone (the trained model's second) scores 0."""
    cfg = eval_config(tmp_path / "gen", "eval.generation.batch_size=4")  # 2 prompts x 2 images per batch
    calls: list[list[int]] = []
    trained: list = []  # the first model sampled is the trained one
    real = runners.sample_prompt_images
    bad_seed = seed_for(cfg.eval.seed, 1)

    def flaky(model, tok, tokenizer, prompts, n, sampling, seeds, max_text_tokens):
        trained[:] = trained or [model]
        calls.append(list(seeds))
        if model is trained[0] and bad_seed in seeds:
            raise RuntimeError("sampler exploded")
        return real(model, tok, tokenizer, prompts, n, sampling, seeds, max_text_tokens)

    monkeypatch.setattr(runners, "sample_prompt_images", flaky)
    out = tmp_path / "gen"
    manifest = run_eval_generation(cfg, corpus, exports[0], str(tiny_tokenizer_path), str(out))
    client, run = _finished_run(out, manifest, "eval_generation")
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) >= 4
    seeds = [seed_for(cfg.eval.seed, i) for i in range(len(prompts))]
    batches = [seeds[i : i + 2] for i in range(0, len(prompts), 2)]
    # trained: every batch, then the failed one's prompts alone; the baseline: every batch once
    assert calls == batches[:1] + [[seeds[0]], [seeds[1]]] + batches[1:] + batches

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 2 * len(prompts)
    assert [(r["prompt_index"], r["index"]) for r in table] == [(i, j) for i in range(len(prompts)) for j in (0, 1)]
    failed = [r for r in table if r["reason"].startswith("generation failed")]
    assert [(r["prompt_index"], r["correct"]) for r in failed] == [(1, False), (1, False)]
    assert "sampler exploded" in failed[0]["reason"]
    assert not table[2]["baseline_reason"].startswith("generation failed")
    # GenEval's folder layout, for the official scorer: a folder per prompt that produced images
    assert manifest["images"] == "images" and manifest["baseline_images"] == "baseline_images"
    folders = sorted(p.name for p in (out / "images").iterdir())
    assert folders == [f"{i:05d}" for i in range(len(prompts)) if i != 1]
    assert json.loads((out / "images" / "00000" / "metadata.jsonl").read_text()) == prompts[0]
    assert sorted(p.name for p in (out / "images" / "00000" / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert len(list((out / "baseline_images").iterdir())) == len(prompts)

    m = manifest["metrics"]
    assert m["failed_generations"] == 2 and m["baseline/failed_generations"] == 0
    assert m["num_images"] == m["baseline/num_images"] == len(table)
    tags = {p["tag"] for p in prompts}
    assert {f"{t}/accuracy" for t in tags} <= set(m) and 0.0 <= m["overall"] <= 1.0 and "baseline/overall" in m
    assert m["reference/num_images"] == len(prompts) and 0.0 <= m["reference/overall"] <= 1.0
    assert {"corpus_manifest", "prompts", "generator", "tokenizer"} == set(manifest["inputs"])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert names == {"grids/generations.png", "grids/baseline_generations.png"}
    assert "prompts.jsonl" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_eval_dpg_on_the_shapes_set(corpus, exports, tiny_tokenizer_path, tmp_path):
    """Each prompt's four images as one 2x2 grid ``images/<item_id>.png`` (the official layout),
    every question asked of every tile; the metrics are the table's answers scored again."""
    out = tmp_path / "dpg"
    manifest = run_eval_dpg(eval_config(out), corpus, exports[0], str(tiny_tokenizer_path), str(out))
    client, run = _finished_run(out, manifest, "eval_dpg")
    items = load_dpg(str(out / "dpg"))
    assert len(items) == 3 and manifest["questions"] == "dpg" and manifest["upstream_bugs"] is False
    for name in ("images", "baseline_images"):
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(f"{i.item_id}.png" for i in items)
        grid = Image.open(out / name / f"{items[0].item_id}.png")
        assert grid.size == (128, 128) and [t.size for t in split_grid(grid)] == [(64, 64)] * 4

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 4 * sum(len(i.questions) for i in items)
    assert all(r["correct"] == (r["answer"] == "yes") and r["error"] is None for r in table)
    m = manifest["metrics"]
    for prefix, column in (("", "answer"), ("baseline/", "baseline_answer")):
        answers = {i.item_id: [{r["proposition_id"]: r[column] for r in table if r["item_id"] == i.item_id
                                and r["tile"] == tile} for tile in range(4)] for i in items}
        scored = {prefix + k: v for k, v in score_dpg(items, answers).metrics().items()}
        assert scored == pytest.approx({k: m[k] for k in scored})
    assert m["failed_generations"] == m["baseline/failed_generations"] == 0
    assert m["num_prompts"] == m["reference/num_prompts"] == 3 and 0.0 <= m["reference/overall"] <= 1.0
    assert {"entity", "attribute", "other", "entity/whole", "baseline/other/count"} <= set(m)
    assert {"corpus_manifest", "questions", "generator", "tokenizer"} == set(manifest["inputs"])
    assert "overall:" in run.data.tags["mlflow.note.content"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert names == {"grids/dpg.png", "grids/baseline_dpg.png"}
    assert "dpg_questions" in {d.dataset.name for d in run.inputs.dataset_inputs}


def test_eval_understanding(corpus, exports, tiny_tokenizer_path, tmp_path):
    out = tmp_path / "und"
    manifest = run_eval_understanding(eval_config(out), corpus, exports[1], str(tiny_tokenizer_path), str(out))
    client, run = _finished_run(out, manifest, "eval_understanding")
    table = pq.read_table(out / "results.parquet").to_pylist()
    subtasks = {r["subtask"] for r in table}
    assert len(table) == 2 * 2 * len(subtasks) and subtasks <= {"existence", "count", "color", "position"}
    assert all(r["question"].endswith("Please answer yes or no.") and r["error"] is None for r in table)
    m = manifest["metrics"]
    assert m["num_questions"] == len(table) and m["undecodable_images"] == 0
    for s in subtasks:
        assert sum(r["correct"] for r in table if r["subtask"] == s) / 4 == pytest.approx(m[f"{s}/accuracy"])
        assert f"baseline/{s}/score" in m
    assert m["perception"] == pytest.approx(sum(m[f"{s}/score"] for s in subtasks))
    assert "commonsense_reasoning" in manifest["missing_subtasks"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "grids")] == ["grids/answers.png"]


def test_eval_pope_on_the_shapes_set(corpus, exports, tiny_tokenizer_path, tmp_path):
    out = tmp_path / "pope"
    manifest = run_eval_pope(eval_config(out), corpus, exports[1], str(tiny_tokenizer_path), str(out))
    client, run = _finished_run(out, manifest, "eval_pope")
    assert sorted(p.name for p in (out / "pope").glob("*.json")) == [
        "shapes_pope_adversarial.json", "shapes_pope_popular.json", "shapes_pope_random.json"]
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert len(table) == 3 * 3 * 6  # splits x images x (3 yes + 3 no)
    m = manifest["metrics"]
    assert m["num_images"] == 3 and m["num_questions"] == len(table) and m["undecodable_images"] == 0
    for split in ("random", "popular", "adversarial"):
        rows = [r for r in table if r["split"] == split]
        assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(m[f"{split}/accuracy"])
        assert sum(r["answer"] == "yes" for r in rows) / len(rows) == pytest.approx(m[f"{split}/yes_ratio"])
        assert f"baseline/{split}/f1" in m
    assert m["f1"] == pytest.approx(sum(m[f"{s}/f1"] for s in ("random", "popular", "adversarial")) / 3)
    # the splits share their positives: asked once per image, the same reply in every split
    positives = {(r["image"], r["question"]): r["reply"] for r in table if r["label"] == "yes"}
    assert len(positives) == 9 and all(positives[(r["image"], r["question"])] == r["reply"]
                                       for r in table if r["label"] == "yes")
    assert {"corpus_manifest", "questions", "understanding", "tokenizer"} == set(manifest["inputs"])
    assert manifest["benchmark"] == "shapes" and "f1:" in run.data.tags["mlflow.note.content"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "grids")] == ["grids/answers.png"]
    assert "pope_questions" in {d.dataset.name for d in run.inputs.dataset_inputs}


def test_eval_pope_on_release_files_scores_an_undecodable_image_wrong(corpus, exports, tiny_tokenizer_path,
                                                                      tmp_path):
    """The official layout (JSON lines under a root, images under another): a question about an
    image that cannot be decoded is scored wrong whatever its label, and counted."""
    images = tmp_path / "val2014"
    images.mkdir()
    sample = next(iter_shard(corpus["splits"]["heldout"]["shards"][0]["url"]))
    (images / "good.png").write_bytes(sample.image)
    (images / "bad.jpg").write_bytes(b"not an image")
    root = tmp_path / "release"
    root.mkdir()
    for split in ("random", "popular", "adversarial"):
        lines = [{"question_id": i + 1, "image": image, "text": "Is there a red circle in the image?", "label": label}
                 for i, (image, label) in enumerate([("good.png", "yes"), ("good.png", "no"), ("bad.jpg", "yes"),
                                                     ("bad.jpg", "no")])]
        (root / f"coco_pope_{split}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    cfg = eval_config(out, "eval.pope.benchmark=pope", f"eval.pope.root_url={root}", f"eval.pope.image_root_url={images}")
    manifest = run_eval_pope(cfg, corpus, exports[1], str(tiny_tokenizer_path), str(out))
    _finished_run(out, manifest, "eval_pope")
    table = pq.read_table(out / "results.parquet").to_pylist()
    bad = [r for r in table if r["image"].endswith("bad.jpg")]
    assert len(bad) == 6 and all(r["error"] == "undecodable" and r["reply"] is None for r in bad)
    assert not any(r["correct"] or r["baseline_correct"] for r in bad)
    m = manifest["metrics"]
    assert m["undecodable_images"] == 1 and m["num_images"] == 2 and m["unparsed_rate"] >= 0.5
    assert "corpus_manifest" not in manifest["inputs"] and manifest["benchmark"] == "pope"


def test_eval_refuses_models_of_another_tokenizer_and_missing_sections(corpus, exports, tiny_config, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_tokenizer(TokenFlowTokenizer(tiny_config, with_teacher=False), other)
    cfg = eval_config(tmp_path)
    with pytest.raises(ValueError, match="another tokenizer"):
        run_eval_generation(cfg, corpus, exports[0], str(other), str(tmp_path / "g"))
    with pytest.raises(ValueError, match="another tokenizer"):
        run_eval_understanding(cfg, corpus, exports[1], str(other), str(tmp_path / "u"))
    with pytest.raises(ValueError, match="another tokenizer"):
        run_eval_pope(cfg, corpus, exports[1], str(other), str(tmp_path / "p"))
    with pytest.raises(ValueError, match="another tokenizer"):
        run_eval_dpg(cfg, corpus, exports[0], str(other), str(tmp_path / "d"))
    bare = load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml")
    with pytest.raises(ConfigError, match="needs the train_generator section"):
        run_eval_generation(bare, corpus, exports[0], str(other), str(tmp_path / "g"))
    with pytest.raises(ConfigError, match="eval_dpg needs the train_generator section"):
        run_eval_dpg(bare, corpus, exports[0], str(other), str(tmp_path / "d"))
    assert not any((tmp_path / name).exists() for name in ("g", "u", "p", "d"))
