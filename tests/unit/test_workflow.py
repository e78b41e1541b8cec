"""Durable stages: identities (what re-runs when one thing changes), the plan, partial runs."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenflow import storage
from tokenflow.config import load_config
from tokenflow.workflow.durable import StageOutput, config_subset
from tokenflow.workflow.identity import PACKAGE, Environment, project_modules
from tokenflow.workflow.pipeline import downstream, resources, stages
from tokenflow.workflow.runner import PlanError, describe, plan

from tests.conftest import REPO

SMOKE = REPO / "configs" / "pipelines" / "smoke.yaml"
LIBRARIES = {"torch": "2.0", "deepspeed": "0.1", "transformers": "4.0", "open_clip_torch": "2.0", "numpy": "1.0",
             "pillow": "10.0"}
ENV = Environment(cluster_gpus=False, libraries=LIBRARIES)


def _complete_all(root, *overrides: str, env: Environment = ENV) -> dict[str, str]:
    """Mark every stage of the config complete, resolving identities as the runner does (each
    stage's manifest names the identity that made it); returns ``{stage: identity}``."""
    cfg = load_config(SMOKE, overrides)
    while todo := [p for p in plan(cfg, str(root), env=env) if p.output is not None and not p.cached]:
        for p in todo:
            storage.write_json_atomic(p.output.manifest_url, {"kind": p.name, "made_by": p.output.hash})
    return {p.name: p.output.hash for p in plan(cfg, str(root), env=env)}


def _reruns(root, *overrides: str, env: Environment = ENV) -> set[str]:
    """The stages that would run (now, or once their inputs re-run) under ``overrides``."""
    return {p.name for p in plan(load_config(SMOKE, overrides), str(root), env=env) if not p.cached}


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    return root, _complete_all(root)


CORPUS, TOKENS, VIEW_TOKENS = "corpus.shapes", "pretokenize.shapes", "pretokenize_generation.shapes"
TEXTS = "texts: [captions, conversations, scenes]"  # what an indexed stand-in for the shapes corpus carries
ALL = {CORPUS, "train_tokenizer", "eval_reconstruction", TOKENS, "train_generator", "train_understanding",
       "eval_generation", "eval_dpg", "eval_understanding", "eval_pope"}


@pytest.mark.parametrize("override,expected", [
    # included: the config a stage reads
    ("train_generator.steps=70", {"train_generator", "eval_generation", "eval_dpg"}),
    ("train_understanding.lr=0.0002", {"train_understanding", "eval_understanding", "eval_pope"}),
    ("pretokenize.micro_batch=8", {TOKENS, "train_generator", "train_understanding", "eval_generation",
                                   "eval_dpg", "eval_understanding", "eval_pope"}),
    ("pretokenize.compression=snappy", ALL - {CORPUS, "train_tokenizer", "eval_reconstruction"}),
    ("train_tokenizer.steps=100", ALL - {CORPUS}),
    ("tokenizer.quantizer.beta=0.5", ALL - {CORPUS}),
    ("corpora.shapes.shapes.seed=1", ALL),
    ("eval.generation.images_per_prompt=3", {"eval_generation"}),
    ("eval.understanding.shapes_per_subtask=5", {"eval_understanding"}),
    ("eval.pope.shapes_images=5", {"eval_pope"}),
    ("eval.dpg.shapes_prompts=5", {"eval_dpg"}),
    ("eval.dpg.upstream_bugs=true", {"eval_dpg"}),
    ("eval.seed=3", {"eval_reconstruction", "eval_generation", "eval_dpg", "eval_understanding", "eval_pope"}),
    # included where it is used: inference settings belong to the evaluations
    ("train_generator.sampling.cfg_scale=1.5", {"eval_generation", "eval_dpg"}),
    ("train_understanding.max_new_tokens=3", {"eval_understanding", "eval_pope"}),
    # the resolved device counts, not the setting: auto already resolved to the CPU here
    ("train_generator.use_gpu=false", set()),
    ("eval.device=cpu", set()),
    # excluded: logging, checkpoint rhythm, held-out probes, worker packing, tracking
    ("train_tokenizer.log_every=7", set()),
    ("train_tokenizer.checkpoint_every=9", set()),
    ("train_tokenizer.image_every=11", set()),
    ("train_tokenizer.heldout_images=4", set()),
    ("train_tokenizer.cpus_per_worker=2", set()),
    ("train_generator.eval_every=13", set()),
    ("train_generator.sample_prompts=2", set()),
    ("train_understanding.heldout_questions=10", set()),
    ("pretokenize.num_actors=1", set()),
    ("pretokenize.batch_size=32", set()),
    ("eval.device=cpu", set()),  # what auto resolves to on this (GPU-less) environment
    ("tracking.experiment=other", set()),
])
def test_one_config_change_reruns_exactly_what_it_changes(completed, override, expected):
    root, base = completed
    assert len(set(base.values())) == len(base) == len(ALL)
    assert _reruns(root, override) == expected


@pytest.mark.parametrize("change,expected", [
    ({"cluster_gpus": True}, ALL - {CORPUS}),  # the tokenizer trains on GPUs: everything after it
    ({"libraries": {**LIBRARIES, "torch": "2.1"}}, ALL - {CORPUS}),
    ({"libraries": {**LIBRARIES, "deepspeed": "0.2"}}, ALL - {CORPUS}),
    ({"libraries": {**LIBRARIES, "pillow": "11.0"}}, ALL),
    ({"libraries": {**LIBRARIES, "pyarrow": "99"}}, set()),
])
def test_the_device_and_library_versions_are_part_of_the_identity(completed, change, expected):
    root, _ = completed
    env = Environment(**{"cluster_gpus": False, "libraries": LIBRARIES, **change})
    assert _reruns(root, env=env) == expected


def test_stage_resources_count_gpus_where_the_settings_take_them():
    """What the runner holds per stage (and an evaluation's Ray task requests): ``auto`` takes
    GPUs only on a cluster that has them; eval.device cuda always holds one."""
    cfg = load_config(SMOKE)
    assert resources(cfg, "eval_generation") == {"CPU": 1.0, "GPU": 0.0}
    assert resources(cfg, "eval_generation", cluster_gpus=True) == {"CPU": 1.0, "GPU": 1.0}
    assert resources(load_config(SMOKE, ["eval.device=cpu", "eval.num_cpus=4"]), "eval_pope", True) == \
        {"CPU": 4.0, "GPU": 0.0}
    assert resources(load_config(SMOKE, ["eval.device=cuda"]), "eval_understanding") == {"CPU": 1.0, "GPU": 1.0}
    assert resources(cfg, "train_generator", cluster_gpus=True) == {"CPU": 2.0, "GPU": 2.0}
    assert resources(cfg, TOKENS, cluster_gpus=False)["GPU"] == 0.0


def test_the_deepspeed_file_contents_are_part_of_the_identity(tmp_path):
    ds = tmp_path / "zero2.yaml"
    shutil.copy(REPO / "configs" / "deepspeed" / "zero2.yaml", ds)
    override = f"train_generator.deepspeed={ds}"
    _complete_all(tmp_path / "s", override)
    assert _reruns(tmp_path / "s", override) == set()
    ds.write_text(ds.read_text() + "\nwall_clock_breakdown: true\n")
    assert _reruns(tmp_path / "s", override) == {"train_generator", "eval_generation", "eval_dpg"}


def test_inputs_count_by_content(tmp_path):
    """A changed upstream output re-runs its dependants; a re-run upstream that made the same
    output (same manifest content) leaves them cached."""
    base = _complete_all(tmp_path)
    corpus = StageOutput.under(str(tmp_path), CORPUS, base[CORPUS])
    storage.write_json_atomic(corpus.manifest_url, {"kind": "corpus", "made_by": "another corpus"})
    assert _reruns(tmp_path) == ALL - {CORPUS}
    storage.write_json_atomic(corpus.manifest_url, {"kind": CORPUS, "made_by": base[CORPUS],
                                                     "mlflow_run_id": "another run"})  # bookkeeping only
    assert _reruns(tmp_path) == set()

    assert _reruns(tmp_path, "train_tokenizer.steps=100") == ALL - {CORPUS}
    retrained = next(p for p in plan(load_config(SMOKE, ["train_tokenizer.steps=100"]), str(tmp_path), env=ENV)
                     if p.name == "train_tokenizer")
    storage.write_json_atomic(retrained.output.manifest_url, {"kind": "train_tokenizer",
                                                              "made_by": base["train_tokenizer"]})
    assert _reruns(tmp_path, "train_tokenizer.steps=100") == set()


def test_an_explicit_gpu_demand_without_gpus_fails_before_any_stage(tmp_path):
    """use_gpu: true (or GPU pretokenize actors, or a cuda evaluation) where there are no GPUs is
    a plan error naming each setting, never a CPU run under the GPU run's cache key; auto stays
    valid and resolves to the CPU (part of the identity, see above)."""
    gpu = ["train_tokenizer.use_gpu=true", "pretokenize.gpus_per_actor=1", "eval.device=cuda"]
    with pytest.raises(PlanError) as err:
        plan(load_config(SMOKE, gpu), str(tmp_path), env=ENV)
    for reason in ("train_tokenizer.use_gpu is true but the Ray cluster has no GPUs",
                   "pretokenize.gpus_per_actor is 1.0 but the Ray cluster has no GPUs",
                   "eval.device is cuda but the Ray cluster has no GPUs"):
        assert reason in str(err.value)
    with_gpus = Environment(cluster_gpus=True, libraries=LIBRARIES)
    assert plan(load_config(SMOKE, gpu), str(tmp_path), env=with_gpus)
    assert plan(load_config(SMOKE, ["train_tokenizer.use_gpu=auto"]), str(tmp_path), env=ENV)
    with pytest.raises(PlanError, match="train_generator.use_gpu is true"):  # only the selected stages count
        plan(load_config(SMOKE, ["train_generator.use_gpu=true"]), str(tmp_path), only="train_generator", env=ENV)


def test_an_indexed_corpus_reruns_when_its_shards_change(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("a.tar", "b.tar"):
        (shards / name).write_bytes(b"x" * 10)
    override = f"corpora.shapes={{source: url, url: {shards}, heldout_shards: 1, {TEXTS}}}"
    _complete_all(tmp_path / "s", override)
    assert _reruns(tmp_path / "s", override) == set()
    (shards / "c.tar").write_bytes(b"y")
    assert _reruns(tmp_path / "s", override) == ALL
    from tokenflow.data.corpus import CorpusError

    with pytest.raises(CorpusError, match="no such file or directory"):
        _reruns(tmp_path / "s", f"corpora.shapes={{source: url, url: {tmp_path / 'gone'}, heldout_shards: 1, {TEXTS}}}")


def test_a_changed_corpus_fails_the_plan_when_configured(tmp_path):
    """corpora.<c>.on_source_change: fail stops before any stage, naming what changed since the
    completed corpus output of the same config; recompute (the default) re-indexes."""
    from tokenflow.stages.corpus import make_corpus

    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ("a.tar", "b.tar", "c.tar"):
        (shards / name).write_bytes(b"")
    corpus = f"corpora.shapes={{source: url, url: {shards}, heldout_shards: 1, on_source_change: fail, {TEXTS}}}"
    cfg = load_config(SMOKE, [corpus])
    made = next(p for p in plan(cfg, str(tmp_path / "s"), env=ENV) if p.name == CORPUS).output
    storage.write_json_atomic(made.manifest_url, make_corpus(cfg.corpora["shapes"], made.url))  # a completed stage
    assert not _reruns(tmp_path / "s", corpus) & {CORPUS}
    (shards / "d.tar").write_bytes(b"")
    (shards / "a.tar").write_bytes(b"rewritten")
    with pytest.raises(PlanError, match=r"shards were added: \S+d.tar; rewritten: \S+a.tar\) and "
                                        r"corpora.shapes.on_source_change is fail"):
        plan(load_config(SMOKE, [corpus]), str(tmp_path / "s"), env=ENV)
    assert CORPUS in _reruns(tmp_path / "s", corpus.replace("change: fail", "change: recompute"))


def test_code_identity_is_the_modules_a_stage_imports(tmp_path):
    """Editing a module a stage imports re-runs it; editing one it never imports (or anything
    outside the package: docs, benchmarks) does not."""
    tokenizer_modules = project_modules("tokenflow.stages.train_tokenizer")
    assert "tokenflow.train.tokenizer_worker" in tokenizer_modules and "tokenflow.models.quantizer" in tokenizer_modules
    assert not {"tokenflow.cli", "tokenflow.eval.geneval", "tokenflow.models.sampling",
                "tokenflow.workflow.runner"} & set(tokenizer_modules)
    assert all(m.startswith("tokenflow") for m in tokenizer_modules)

    package = tmp_path / "tokenflow"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    env = Environment(cluster_gpus=False, libraries=LIBRARIES, package=package)
    _complete_all(tmp_path / "s", env=env)
    (package / "cli.py").write_text((package / "cli.py").read_text() + "\n# an unrelated edit\n")
    assert _reruns(tmp_path / "s", env=Environment(False, LIBRARIES, package)) == set()
    (package / "eval" / "shapes_geneval.py").write_text((package / "eval" / "shapes_geneval.py").read_text() + "\n#\n")
    assert _reruns(tmp_path / "s", env=Environment(False, LIBRARIES, package)) == {"eval_generation", "eval_dpg"}


FINETUNE = "finetune_decoder={steps: 50, decoder_ch: 32, lr_schedule: {warmup_steps: 5}}"
VIEW = "train_generator.tokenizer_view={image_size: 72, scales: [1, 2, 3, 4, 6, 8, 9]}"


def test_a_decoder_finetune_reruns_the_decoding_evaluations_only(tmp_path):
    """Tokens do not depend on the fine-tuned decoder: adding the stage changes no token shard
    or LLM stage identity, only the evaluations that decode with its export."""
    base = _complete_all(tmp_path)
    assert _reruns(tmp_path, FINETUNE) == {"finetune_decoder", "eval_reconstruction", "eval_generation", "eval_dpg"}
    tuned = _complete_all(tmp_path, FINETUNE)
    assert set(tuned) == set(base) | {"finetune_decoder"}
    assert {n for n in base if tuned[n] != base[n]} == {"eval_reconstruction", "eval_generation", "eval_dpg"}
    assert _reruns(tmp_path, FINETUNE, "finetune_decoder.steps=60") == {"finetune_decoder", "eval_reconstruction",
                                                                        "eval_generation", "eval_dpg"}
    assert _reruns(tmp_path, FINETUNE, "tokenizer.discriminator.start_step=7") == ALL - {CORPUS} | {
        "finetune_decoder"}  # the fine-tune trains with the pipeline's loss settings


def test_a_generation_view_adds_its_own_token_shards(tmp_path):
    cfg = load_config(SMOKE, [VIEW])
    specs = {s.name: s for s in stages(cfg)}
    assert specs["train_generator"].inputs == (VIEW_TOKENS, "train_tokenizer")
    assert specs["train_understanding"].inputs == (TOKENS, "train_tokenizer")
    base = _complete_all(tmp_path)
    assert _reruns(tmp_path, VIEW) == {VIEW_TOKENS, "train_generator", "eval_generation", "eval_dpg"}
    viewed = _complete_all(tmp_path, VIEW)
    assert set(viewed) == set(base) | {VIEW_TOKENS}
    assert {n for n in base if viewed[n] != base[n]} == {"train_generator", "eval_generation", "eval_dpg"}


def test_a_config_with_every_optional_stage_has_every_stage_name():
    from tokenflow.workflow.pipeline import CORPUS_STAGES, STAGE_NAMES

    cfg = load_config(REPO / "configs" / "pipelines" / "tokenflow-b.yaml", ["eval.lmms.tasks=[mme]"])  # opt-in stage
    specs = stages(cfg)
    names = [s.name for s in specs]
    assert sorted(n for n in names if "." not in n) == sorted(STAGE_NAMES)
    assert {n.split(".", 1)[0] for n in names if "." in n} == set(CORPUS_STAGES)
    seen: set[str] = set()
    for spec in specs:  # dependency order: every input comes earlier
        assert set(spec.inputs) <= seen, spec.name
        seen.add(spec.name)


def test_stages_without_their_section_are_left_out(tmp_path):
    data = load_config(SMOKE).model_dump(mode="json")
    data.pop("train_generator")
    from tokenflow.config import validate

    names = [p.name for p in plan(validate(data), str(tmp_path), env=ENV)]
    assert not {"train_generator", "eval_generation", "eval_dpg"} & set(names) and "train_understanding" in names
    with pytest.raises(PlanError, match="no stage 'train_generator'"):
        plan(validate(data), str(tmp_path), only="train_generator", env=ENV)


def test_identities_are_stable_and_the_config_subset_leaves_out_exclusions(tmp_path):
    assert _complete_all(tmp_path) == _complete_all(tmp_path)
    assert config_subset({"a": {"b": 1, "c": {"d": 2, "e": 3}}}, ("a", "x"), ("a.c.e",)) == {
        "a": {"b": 1, "c": {"d": 2}}, "x": None}


def test_complete_stages_are_cached_and_partial_runs_need_their_inputs(tmp_path):
    cfg = load_config(SMOKE)
    first = plan(cfg, str(tmp_path), env=ENV)
    assert [p.status for p in first] == ["run"] + ["pending"] * (len(first) - 1)
    with pytest.raises(PlanError, match="pretokenize.shapes needs corpus.shapes, train_tokenizer"):
        plan(cfg, str(tmp_path), only=TOKENS, env=ENV)
    for name in (CORPUS, "train_tokenizer"):  # mark both complete, in order
        output = next(p.output for p in plan(cfg, str(tmp_path), env=ENV) if p.name == name)
        storage.write_json_atomic(output.manifest_url, {"kind": name})
    partial = {p.name: p.status for p in plan(cfg, str(tmp_path), only=TOKENS, env=ENV)}
    assert partial[CORPUS] == partial["train_tokenizer"] == "cached"
    assert partial[TOKENS] == "run" and partial["train_generator"] == "skipped"
    started = {p.name: p.status for p in plan(cfg, str(tmp_path), start=TOKENS, env=ENV)}
    assert [n for n, s in started.items() if s in ("run", "pending")] == [
        TOKENS, "train_generator", "train_understanding", "eval_generation", "eval_dpg", "eval_understanding",
        "eval_pope"]
    assert started["eval_reconstruction"] == "skipped"
    assert "eval_reconstruction" in describe(plan(cfg, str(tmp_path), env=ENV))


def test_downstream_and_output_layout(tmp_path):
    assert downstream(stages(load_config(SMOKE)), {"train_generator"}) == {"train_generator", "eval_generation",
                                                                           "eval_dpg"}
    out = StageOutput.under(str(tmp_path), CORPUS, "ab" * 32)
    assert out.url.endswith(f"{CORPUS}/" + "ab" * 6) and not out.complete()
    storage.write_json_atomic(out.manifest_url, {"ok": 1})
    assert out.complete() and out.manifest() == {"ok": 1}
    assert json.loads((tmp_path / CORPUS / ("ab" * 6) / "_MANIFEST.json").read_text()) == {"ok": 1}


def test_full_py_validates_the_config_before_any_cluster_work(tmp_path):
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "pipelines/full.py", "--config", str(SMOKE), "--set",
                          "train_generator.steps=-1", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "train_generator.steps" in bad.stderr
    pope = subprocess.run([sys.executable, "pipelines/full.py", "--config", str(SMOKE), "--set",
                           "eval.pope.benchmark=pope", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert pope.returncode == 2 and "eval.pope: benchmark pope needs root_url, image_root_url" in pope.stderr
    dpg = subprocess.run([sys.executable, "pipelines/full.py", "--config", str(SMOKE), "--set",
                          "eval.dpg.benchmark=dpg", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert dpg.returncode == 2 and "eval.dpg: benchmark dpg needs root_url, vqa_model_path" in dpg.stderr
    dry = subprocess.run([sys.executable, "pipelines/full.py", "--config", str(SMOKE), "--storage", str(tmp_path),
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, check=True)
    assert dry.stdout.count(" run ") + dry.stdout.count(" pending ") == 10 and not (tmp_path / CORPUS).exists()


def _local_stand_ins(cfg, root):
    """``cfg`` with every indexed corpus read from local stand-ins (planning lists their shards)."""
    corpora = {}
    for name, c in cfg.corpora.items():
        if c.source == "url":
            (root / name).mkdir()
            if c.format == "llava":
                (root / name / "data.json").write_text("[]")
                c = c.model_copy(update={"url": str(root / name / "data.json")})
            else:
                for split in ("train", "heldout"):
                    (root / name / split).mkdir()
                    (root / name / split / "000.tar").write_bytes(b"")
                c = c.model_copy(update={"url": str(root / name / "train"), "heldout_url": str(root / name / "heldout")})
        corpora[name] = c
    return cfg.model_copy(update={"corpora": corpora})


@pytest.mark.parametrize("name,corpora,count", [("smoke", 1, 10), ("ci", 1, 10), ("tokenflow-b", 5, 18),
                                                ("tokenflow-xl", 6, 19)])
def test_every_pipeline_config_validates_and_plans(name, corpora, count, tmp_path):
    cfg = _local_stand_ins(load_config(REPO / "configs" / "pipelines" / f"{name}.yaml"), tmp_path)
    assert cfg.train_generator is not None and cfg.train_understanding is not None
    planned = plan(cfg, str(tmp_path / "out"), env=ENV)
    assert [p.status for p in planned] == ["run"] * corpora + ["pending"] * (count - corpora)
    assert all(p.name.startswith("corpus.") for p in planned[:corpora])


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


def test_tracking_that_would_fail_after_training_is_refused_at_plan_time(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(SMOKE, ["tracking.tracking_uri=https://user:pw@mlflow.internal"])
    with pytest.raises(PlanError, match="cannot register exports on this disk") as refused:
        plan(cfg, str(tmp_path), env=ENV)
    assert "user:pw" not in str(refused.value)
    assert plan(load_config(SMOKE, ["tracking.tracking_uri=https://mlflow.internal", "tracking.registered_models={}"]),
                str(tmp_path), env=ENV)
    with pytest.raises(PlanError, match="set tracking.tracking_uri"):
        plan(load_config(SMOKE), "s3://bucket/prefix", env=ENV)
