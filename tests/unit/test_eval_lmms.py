"""lmms-eval glue that runs without the extra: metric names, the eval.lmms config, the stage's
place in the DAG and the error when the extra is missing (the end-to-end runs with lmms-eval are
tests/integration/test_lmms_eval.py)."""

from __future__ import annotations

import math
import sys

import pytest

from tokenflow.config import ConfigError, load_config
from tokenflow.eval.lmms import flatten_results, metric_name, require_lmms_eval
from tokenflow.workflow.pipeline import stages

from tests.conftest import REPO

SMOKE = REPO / "configs" / "pipelines" / "smoke.yaml"


@pytest.mark.parametrize("parts,expected", [
    (("mme", "perception"), "mme/perception"),
    (("mmbench_en/dev", "gpt_eval_score", "flexible-extract"), "mmbench_en/dev/gpt_eval_score/flexible-extract"),
    (("task:a", "acc(norm)"), "task_a/acc_norm_"),
    (("a//b/", "c"), "a/b/c"),
    (("..", ".", "x"), "__/_/x"),
    (("vqa·v2", "exact match"), "vqa_v2/exact match"),
])
def test_metric_names_are_mlflow_safe(parts, expected):
    assert metric_name(*parts) == expected


def test_every_finite_number_of_the_results_is_a_metric(caplog):
    results = {
        "tiny_yesno": {"alias": "tiny_yesno", "exact_match,none": 0.5, "exact_match_stderr,none": "N/A",
                       "exact_match_stderr_clt,none": 0.29, "flag,none": True},
        "gsm": {"exact_match,strict-match": 1, "exact_match,flexible-extract": 0.25, "broken,none": math.nan},
    }
    assert flatten_results(results) == {"tiny_yesno/exact_match": 0.5, "tiny_yesno/exact_match_stderr_clt": 0.29,
                                        "gsm/exact_match/strict-match": 1.0,
                                        "gsm/exact_match/flexible-extract": 0.25}
    assert "gsm broken,none = nan" in caplog.text
    with pytest.raises(ValueError, match="both become 'a_b/acc'"):
        flatten_results({"a:b": {"acc,none": 1.0}, "a_b": {"acc,none": 0.0}})


@pytest.mark.parametrize("override,message", [
    ("eval.lmms.tasks=[mme, mme]", "tasks named more than once: ['mme']"),
    ("eval.lmms.tasks=['', mme]", "non-empty"),
    ("eval.lmms.tasks=[' mme']", "without surrounding spaces"),
    ("eval.lmms.include_path=''", "eval.lmms.include_path"),
    ("eval.lmms.batch_size=0", "eval.lmms.batch_size"),
    ("eval.lmms.limit=0", "eval.lmms.limit"),
])
def test_the_lmms_section_is_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(SMOKE, [override])


def test_lmms_tasks_need_the_understanding_model():
    with pytest.raises(ConfigError, match="eval.lmms.tasks needs the train_understanding section"):
        load_config(SMOKE, ["train_understanding=null", "eval.lmms.tasks=[mme]"])


def test_the_stage_exists_only_with_tasks_and_is_identified_by_them(tmp_path):
    assert "eval_understanding_lmms" not in {s.name for s in stages(load_config(SMOKE))}
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "tiny.yaml").write_text("task: tiny\n")
    cfg = load_config(SMOKE, ["eval.lmms.tasks=[tiny, mme]", f"eval.lmms.include_path={folder}"])
    spec = {s.name: s for s in stages(cfg)}["eval_understanding_lmms"]
    assert spec.inputs == ("train_tokenizer", "train_understanding") and spec.device == "eval"
    assert "eval.lmms" in spec.config and "lmms-eval" in spec.libraries
    before = spec.sources(cfg)
    (folder / "tiny.yaml").write_text("task: tiny\noutput_type: generate_until\n")
    assert set(before) == {"lmms_tasks"} and spec.sources(cfg) != before  # an edited task re-runs the stage
    assert spec.sources(load_config(SMOKE, ["eval.lmms.tasks=[mme]"])) == {}
    with pytest.raises(ConfigError, match="is not a folder"):
        spec.sources(load_config(SMOKE, ["eval.lmms.tasks=[mme]", f"eval.lmms.include_path={tmp_path / 'no'}"]))


def test_without_the_extra_the_stage_names_it(monkeypatch, tmp_path):
    from tokenflow.stages.eval_understanding_lmms import run_eval_understanding_lmms

    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # what an environment without the extra sees
    with pytest.raises(ImportError, match=r"pip install 'tokenflow-pipeline\[lmms\]'"):
        require_lmms_eval()
    cfg = load_config(SMOKE, ["eval.lmms.tasks=[mme]"])
    with pytest.raises(ImportError, match="lmms-eval is not installed"):  # before any model is loaded
        run_eval_understanding_lmms(cfg, str(tmp_path / "no-model"), str(tmp_path / "no-tokenizer"), str(tmp_path))
    assert not any(tmp_path.iterdir())
