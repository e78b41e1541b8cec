from pathlib import Path

import pytest
import yaml

from tokenflow.config import ConfigError, apply_overrides, config_hash, load_config

from tests.conftest import MODEL_CONFIGS

TINY = MODEL_CONFIGS / "tokenflow-tiny.yaml"


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_model_config_validates():
    for path in sorted(MODEL_CONFIGS.glob("*.yaml")):
        cfg = load_config(path).tokenizer
        assert cfg.quantizer.scales[-1] == cfg.grid_size, path


def test_override_changes_value_and_type_is_parsed():
    cfg = load_config(TINY, ["tokenizer.quantizer.codebook_size=4096"])
    assert cfg.tokenizer.quantizer.codebook_size == 4096
    cfg = load_config(TINY, ["tokenizer.quantizer.scales=[1, 2, 4, 8]"])
    assert cfg.tokenizer.quantizer.scales == (1, 2, 4, 8)


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"tokenizer\.quantizer\.codebok_size: unknown key"):
        load_config(TINY, ["tokenizer.quantizer.codebok_size=4096"])


def test_wrong_type_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"tokenizer\.quantizer\.codebook_size: .*integer.*'many'"):
        load_config(TINY, ["tokenizer.quantizer.codebook_size=many"])


def test_scale_larger_than_latent_grid_is_rejected():
    with pytest.raises(ConfigError, match=r"scales \[16\] exceed the latent grid 8x8"):
        load_config(TINY, ["tokenizer.quantizer.scales=[1, 2, 4, 8, 16]"])


def test_last_scale_must_be_the_grid():
    with pytest.raises(ConfigError, match="last quantizer scale must equal the latent grid 8, got 6"):
        load_config(TINY, ["tokenizer.quantizer.scales=[1, 2, 4, 6]"])


def test_scales_must_increase():
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_config(TINY, ["tokenizer.quantizer.scales=[1, 4, 2, 8]"])


def test_grid_mismatch_between_encoders_suggests_pixel_image_size():
    with pytest.raises(ConfigError, match="set pixel_image_size to 128"):
        load_config(TINY, ["tokenizer.semantic_encoder.patch_size=4",
                           "tokenizer.quantizer.scales=[1, 2, 4, 8, 16]"])


def test_perceptual_enabled_without_weights_is_rejected():
    with pytest.raises(ConfigError, match="perceptual loss is enabled but"):
        load_config(TINY, ["tokenizer.perceptual.enabled=true"])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["tokenizer.bogus=1", "tokenizer.quantizer.beta=-1"])
    assert "tokenizer.bogus: unknown key" in str(err.value)
    assert "tokenizer.quantizer.beta" in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key.path=value"):
        apply_overrides({}, ["tokenizer.quantizer"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_include_merges_and_own_keys_win(tmp_path):
    base = _write(tmp_path, "base.yaml", {"tokenizer": {"name": "base", "image_size": 64}})
    top = _write(tmp_path, "top.yaml", {"include": base.name, "tokenizer": {"name": "top"}})
    from tokenflow.config import load_yaml_tree

    assert load_yaml_tree(top) == {"tokenizer": {"name": "top", "image_size": 64}}


def test_include_cycle_and_missing_file(tmp_path):
    _write(tmp_path, "a.yaml", {"include": "b.yaml"})
    _write(tmp_path, "b.yaml", {"include": "a.yaml"})
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_hash_is_stable_and_ignores_key_order():
    a = {"x": 1, "y": {"b": [1, 2], "a": "s"}}
    b = {"y": {"a": "s", "b": [1, 2]}, "x": 1}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "x": 2})
    cfg1 = load_config(TINY)
    cfg2 = load_config(TINY, ["tokenizer.name=tokenflow-tiny"])
    assert config_hash(cfg1) == config_hash(cfg2)
    assert config_hash(cfg1) != config_hash(load_config(TINY, ["tokenizer.quantizer.beta=0.5"]))


def test_eval_section_defaults_run_the_cpu_shapes_benchmarks():
    cfg = load_config(TINY).eval
    assert (cfg.generation.benchmark, cfg.understanding.benchmark) == ("shapes", "shapes")
    assert cfg.reconstruction.fid.inception_weights is None and cfg.generation.sampling is None


def test_eval_real_benchmarks_need_their_data_and_weights():
    with pytest.raises(ConfigError, match=r"eval\.generation: benchmark geneval needs metadata_url, "
                                          r"detector_path, clip_weights"):
        load_config(TINY, ["eval.generation.benchmark=geneval"])
    with pytest.raises(ConfigError, match=r"eval\.understanding: benchmark mme needs root_url"):
        load_config(TINY, ["eval.understanding.benchmark=mme"])
    cfg = load_config(TINY, ["eval.generation.benchmark=geneval", "eval.generation.metadata_url=m.jsonl",
                             "eval.generation.detector_path=/w/det", "eval.generation.clip_weights=/w/clip",
                             "eval.understanding.benchmark=mme", "eval.understanding.root_url=s3://b/mme"])
    assert cfg.eval.generation.detector_path == "/w/det" and cfg.eval.understanding.root_url == "s3://b/mme"


def test_eval_section_rejects_bad_values_with_their_paths():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["eval.reconstruction.fid.architecture=tf", "eval.generation.images_per_prompt=0",
                           "eval.generation.sampling={top_k: [1], top_p: [0.8, 0.0]}", "eval.bogus=1"])
    message = str(err.value)
    for where in ("eval.reconstruction.fid.architecture", "eval.generation.images_per_prompt",
                  "eval.generation.sampling: top_k has 1 rounds but top_p 2", "eval.bogus: unknown key"):
        assert where in message, where


def test_registered_models_name_only_model_stages():
    with pytest.raises(ConfigError, match="not model stages"):
        load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", ["tracking.registered_models={corpus: x}"])
    with pytest.raises(ConfigError, match="empty name"):
        load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", ["tracking.registered_models={train_generator: ' '}"])
    cfg = load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", ["tracking.registered_models={}"])
    assert cfg.tracking.registered_models == {} and cfg.tracking.registry_alias == "candidate"


def test_fault_tolerance_settings_are_bounded_and_checked():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train_tokenizer.max_failures=-1", "train_tokenizer.keep_checkpoints=1",
                           "train_tokenizer.corrupt_checkpoint=ignore", "pretokenize.max_actor_restarts=-1",
                           "pretokenize.max_attempts=0", "workflow.when_busy=steal"])
    message = str(err.value)
    for where in ("train_tokenizer.max_failures", "train_tokenizer.keep_checkpoints",
                  "train_tokenizer.corrupt_checkpoint", "pretokenize.max_actor_restarts", "pretokenize.max_attempts",
                  "workflow.when_busy"):
        assert where in message, where
    with pytest.raises(ConfigError, match=r"lease_renew_s \(120.0\) must be at most a third of lease_ttl_s"):
        load_config(TINY, ["workflow.lease_renew_s=120"])
    cfg = load_config(TINY)
    assert (cfg.train_tokenizer.max_failures, cfg.train_tokenizer.corrupt_checkpoint, cfg.workflow.when_busy) == (
        3, "fallback", "wait")
    with pytest.raises(ConfigError, match=r"num_workers must be a positive number or \[min, max\]"):
        load_config(TINY, ["train_tokenizer.num_workers=[4, 2]"])
    elastic = load_config(TINY, ["train_tokenizer.num_workers=[2, 8]"]).train_tokenizer
    assert (elastic.num_workers, elastic.worker_range) == ((2, 8), (2, 8))
    fixed = load_config(TINY, ["train_tokenizer.num_workers=3"]).train_tokenizer
    assert fixed.worker_range == (3, 3)
