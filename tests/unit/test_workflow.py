"""Durable stages: identities, the plan, partial runs."""

from __future__ import annotations

import json

import pytest

from tokenflow import storage
from tokenflow.config import load_config
from tokenflow.workflow.durable import StageOutput, code_version, config_subset
from tokenflow.workflow.pipeline import downstream, stages
from tokenflow.workflow.runner import PlanError, describe, plan

from tests.conftest import REPO

SMOKE = REPO / "configs" / "pipelines" / "smoke.yaml"


def _hashes(tmp_path, *overrides: str) -> dict[str, str]:
    return {p.name: p.output.hash for p in plan(load_config(SMOKE, overrides), str(tmp_path))}


def test_a_config_change_reruns_exactly_the_dependants(tmp_path):
    base = _hashes(tmp_path)
    assert len(set(base.values())) == len(base)
    cases = {
        "train_generator.steps=70": {"train_generator", "eval_generation"},
        "train_generator.sampling.cfg_scale=1.5": {"train_generator", "eval_generation"},
        "train_understanding.lr=0.0002": {"train_understanding", "eval_understanding"},
        "pretokenize.micro_batch=8": {"pretokenize", "train_generator", "train_understanding", "eval_generation",
                                      "eval_understanding"},
        "train_tokenizer.steps=100": set(base) - {"corpus"},
        "corpus.shapes.seed=1": set(base),
        "eval.generation.images_per_prompt=3": {"eval_generation"},
        "eval.understanding.shapes_per_subtask=5": {"eval_understanding"},
        "eval.seed=3": {"eval_reconstruction", "eval_generation", "eval_understanding"},
        "tracking.experiment=other": set(),
    }
    for override, expected in cases.items():
        changed = {name for name, h in _hashes(tmp_path, override).items() if h != base[name]}
        assert changed == expected, override


FINETUNE = "finetune_decoder={steps: 50, decoder_ch: 32, lr_schedule: {warmup_steps: 5}}"
VIEW = "train_generator.tokenizer_view={image_size: 72, scales: [1, 2, 3, 4, 6, 8, 9]}"


def test_a_decoder_finetune_reruns_the_decoding_evaluations_only(tmp_path):
    """Tokens do not depend on the fine-tuned decoder: adding the stage changes no token shard
    or LLM stage identity, only the evaluations that decode with its export."""
    base = _hashes(tmp_path)
    tuned = _hashes(tmp_path, FINETUNE)
    assert set(tuned) == set(base) | {"finetune_decoder"}
    assert {n for n in base if tuned[n] != base[n]} == {"eval_reconstruction", "eval_generation"}
    again = _hashes(tmp_path, FINETUNE, "finetune_decoder.steps=60")
    assert {n for n in tuned if again[n] != tuned[n]} == {"finetune_decoder", "eval_reconstruction",
                                                          "eval_generation"}


def test_a_generation_view_adds_its_own_token_shards(tmp_path):
    cfg = load_config(SMOKE, [VIEW])
    specs = {s.name: s for s in stages(cfg)}
    assert specs["train_generator"].inputs == ("pretokenize_generation", "train_tokenizer")
    assert specs["train_understanding"].inputs == ("pretokenize", "train_tokenizer")
    base, viewed = _hashes(tmp_path), _hashes(tmp_path, VIEW)
    assert set(viewed) == set(base) | {"pretokenize_generation"}
    assert {n for n in base if viewed[n] != base[n]} == {"train_generator", "eval_generation"}


def test_a_config_with_every_optional_stage_has_every_stage_name():
    from tokenflow.workflow.pipeline import STAGE_NAMES

    cfg = load_config(REPO / "configs" / "pipelines" / "tokenflow-b.yaml")
    specs = stages(cfg)
    assert sorted(s.name for s in specs) == sorted(STAGE_NAMES)
    seen: set[str] = set()
    for spec in specs:  # dependency order: every input comes earlier
        assert set(spec.inputs) <= seen, spec.name
        seen.add(spec.name)


def test_stages_without_their_section_are_left_out(tmp_path):
    data = load_config(SMOKE).model_dump(mode="json")
    data.pop("train_generator")
    from tokenflow.config import validate

    names = [p.name for p in plan(validate(data), str(tmp_path))]
    assert "train_generator" not in names and "eval_generation" not in names and "train_understanding" in names
    with pytest.raises(PlanError, match="no stage 'train_generator'"):
        plan(validate(data), str(tmp_path), only="train_generator")


def test_identity_covers_code_and_is_stable(tmp_path):
    assert _hashes(tmp_path) == _hashes(tmp_path)
    assert len(code_version()) == 64
    assert config_subset({"a": {"b": 1}}, ("a.b", "a.c", "x")) == {"a.b": 1, "a.c": None, "x": None}


def test_complete_stages_are_cached_and_partial_runs_need_their_inputs(tmp_path):
    cfg = load_config(SMOKE)
    stages = plan(cfg, str(tmp_path))
    assert all(p.status == "run" for p in stages)
    with pytest.raises(PlanError, match="pretokenize needs corpus, train_tokenizer"):
        plan(cfg, str(tmp_path), only="pretokenize")
    for name in ("corpus", "train_tokenizer"):  # mark both complete
        output = next(p.output for p in stages if p.name == name)
        storage.write_json_atomic(output.manifest_url, {"kind": name})
    partial = {p.name: p.status for p in plan(cfg, str(tmp_path), only="pretokenize")}
    assert partial["corpus"] == partial["train_tokenizer"] == "cached"
    assert partial["pretokenize"] == "run" and partial["train_generator"] == "skipped"
    started = {p.name: p.status for p in plan(cfg, str(tmp_path), start="pretokenize")}
    assert [n for n, s in started.items() if s == "run"] == [
        "pretokenize", "train_generator", "train_understanding", "eval_generation", "eval_understanding"]
    assert "eval_reconstruction" in describe(plan(cfg, str(tmp_path)))


def test_downstream_and_output_layout(tmp_path):
    assert downstream(stages(load_config(SMOKE)), {"train_generator"}) == {"train_generator", "eval_generation"}
    out = StageOutput.under(str(tmp_path), "corpus", "ab" * 32)
    assert out.url.endswith("corpus/" + "ab" * 6) and not out.complete()
    storage.write_json_atomic(out.manifest_url, {"ok": 1})
    assert out.complete() and out.manifest() == {"ok": 1}
    assert json.loads((tmp_path / "corpus" / ("ab" * 6) / "_MANIFEST.json").read_text()) == {"ok": 1}


def test_full_py_validates_the_config_before_any_cluster_work(tmp_path):
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "pipelines/full.py", "--config", str(SMOKE), "--set",
                          "train_generator.steps=-1", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "train_generator.steps" in bad.stderr
    dry = subprocess.run([sys.executable, "pipelines/full.py", "--config", str(SMOKE), "--storage", str(tmp_path),
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, check=True)
    assert dry.stdout.count(" run ") == 8 and not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("name,count", [("smoke", 8), ("ci", 8), ("tokenflow-b", 10), ("tokenflow-xl", 9)])
def test_every_pipeline_config_validates_and_plans(name, count, tmp_path):
    cfg = load_config(REPO / "configs" / "pipelines" / f"{name}.yaml")
    assert cfg.train_generator is not None and cfg.train_understanding is not None
    assert [p.status for p in plan(cfg, str(tmp_path))] == ["run"] * count


def test_tokenflow_b_understands_at_224_and_generates_at_256():
    """The reference's two uses of TokenFlow-B: 224 px / 561 tokens for understanding, 256 px with
    an interpolated 16x16 last scale / 817 tokens for text-to-image."""
    cfg = load_config(REPO / "configs" / "pipelines" / "tokenflow-b.yaml")
    assert (cfg.tokenizer.image_size, cfg.tokenizer.quantizer.num_tokens) == (224, 561)
    generation = cfg.tokenizer.at_view(cfg.train_generator.tokenizer_view)
    assert (generation.image_size, generation.grid_size, generation.quantizer.num_tokens) == (256, 16, 817)
    assert generation.quantizer.scales == (1, 2, 4, 6, 8, 10, 12, 14, 16)
    t = cfg.train_generator  # the reference's t2i optimisation
    assert (t.lr, t.lr_schedule.warmup_steps, t.lr_schedule.decay, t.weight_decay, t.grad_clip) == (
        5e-4, 5000, "constant", 0.1, 0.5)
    assert t.language_model.max_text_tokens == 128 and t.deepspeed.endswith("bf16") and t.qk_norm
    tuned = cfg.finetune_decoder.tokenizer_config(cfg.tokenizer)
    assert (tuned.pixel_codec.decoder_ch, tuned.pixel_codec.decoder_num_res_blocks) == (256, 4)


def test_a_view_that_does_not_fit_the_grid_is_rejected_before_any_work():
    from tokenflow.config import ConfigError

    with pytest.raises(ConfigError, match="tokenizer_view: the last quantizer scale must equal the latent grid 9"):
        load_config(SMOKE, ["train_generator.tokenizer_view={image_size: 72, scales: [1, 2, 4, 8]}"])
