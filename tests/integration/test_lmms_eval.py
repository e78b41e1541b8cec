"""lmms-eval end to end with the tiny understanding export: the model class registered through the
entry point on local tasks in lmms-eval's format (Parquet with an image column and task YAMLs,
written here), and the eval_understanding_lmms stage logging them to MLflow. Needs the
tokenflow-pipeline[lmms] extra."""

from __future__ import annotations

import io
import json
import os

import mlflow
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="the tokenflow-pipeline[lmms] extra is not installed")

from lmms_eval.api.instance import GenerationResult, Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from tokenflow.data.corpus import iter_shard  # noqa: E402
from tokenflow.data.decode import preprocess  # noqa: E402
from tokenflow.eval.lmms import evaluate_tasks, flatten_results, hf_offline  # noqa: E402
from tokenflow.eval.lmms_model import TokenFlowUnderstanding, cut  # noqa: E402
from tokenflow.models.llm_weights import load_understanding  # noqa: E402
from tokenflow.models.text import chat_answer, chat_prompt, encode_text  # noqa: E402
from tokenflow.models.understanding import IGNORE, ChatBatch  # noqa: E402
from tokenflow.models.weights import load_tokenizer  # noqa: E402
from tokenflow.stages.eval_understanding_lmms import run_eval_understanding_lmms  # noqa: E402

from tests.integration.conftest import eval_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # corpus, exports: conftest.py

TASKS = ("tiny_yesno", "tiny_mc", "tiny_rounds")
COMMON = """\
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_visual: image
metadata:
  version: 0.0
"""
YAMLS = {
    "tiny_yesno": """\
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs: {{max_new_tokens: 4, until: ["\\n"]}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true, ignore_punctuation: true}}
""",
    "tiny_mc": """\
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: ["yes", "no"]
doc_to_target: "{{{{['yes', 'no'].index(answer)}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
""",
    "tiny_rounds": """\
output_type: generate_until_multi_round
doc_to_text: !function rounds.doc_to_text
doc_to_target: answer
process_results: !function rounds.process_results
generation_kwargs: {{max_new_tokens: 3}}
metric_list:
  - {{metric: rounds, aggregation: mean, higher_is_better: true}}
""",
}
ROUNDS = '''\
def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    """Round 0 asks the question; rounds 1 and 2 ask again (no new image); then terminal."""
    if round_idx is None:
        return doc["question"]
    assert len(previous_output) == round_idx and previous_round_info == (round_idx - 1 or None)
    if round_idx == 3:
        return None, None, True, previous_output, None
    return None, "And again: " + doc["question"], False, previous_output, round_idx


def process_results(doc, results):
    replies = results[0]
    assert all(isinstance(r, str) for r in replies), replies
    return {"rounds": float(len(replies))}
'''


@pytest.fixture(scope="module")
def docs(corpus):
    """Four held-out shapes images with one of their yes/no questions each."""
    samples = []
    for record in corpus["splits"]["heldout"]["shards"]:
        samples += [s for s in iter_shard(record["url"]) if s.image is not None][: 4 - len(samples)]
    return [{"image": Image.open(io.BytesIO(s.image)), "question": json.loads(s.json)["questions"][i % 2]["question"],
             "answer": json.loads(s.json)["questions"][i % 2]["answer"]} for i, s in enumerate(samples)]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, docs):
    """A task folder as lmms-eval's --include_path reads it, its Parquet data inside."""
    import datasets

    root = tmp_path_factory.mktemp("lmms-tasks")
    (root / "data").mkdir()
    data = root / "data" / "test.parquet"
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    datasets.Dataset.from_list(docs, features=features).to_parquet(str(data))
    for task, body in YAMLS.items():
        (root / f"{task}.yaml").write_text(f"task: {task}\n" + COMMON.format(data=data) + body.format())
    (root / "rounds.py").write_text(ROUNDS)
    return root


@pytest.fixture(scope="module")
def models(exports, tiny_tokenizer_path):
    model, tok = load_understanding(exports[1])
    return model, tok, load_tokenizer(tiny_tokenizer_path).eval()


def _requests(kind: str, rows: list[tuple]) -> list[Instance]:
    return [Instance(kind, args, 0, {"task": "t", "doc_id": args[3], "repeats": 1}) for args in rows]


def _instance(models, docs, batch_size: int) -> TokenFlowUnderstanding:
    lm = TokenFlowUnderstanding.from_models(*models, batch_size=batch_size)
    lm.task_dict = {"t": {"test": docs}}
    return lm


def test_the_registered_model_passes_local_tasks_end_to_end(exports, tiny_tokenizer_path, task_folder):
    """By name through the entry point, built from model_args as lmms-eval's CLI builds it."""
    model = get_model("tokenflow").create_from_arg_string(
        f"pretrained={exports[1]},tokenizer={tiny_tokenizer_path},max_new_tokens=4", {"batch_size": 3, "device": "cpu"})
    results = evaluate_tasks(model, TASKS, str(task_folder), batch_size=3, limit=None, seed=0)
    assert os.environ.get("HF_HUB_OFFLINE") is None  # offline for the run only

    assert results["n-samples"] == {t: {"original": 4, "effective": 4} for t in TASKS}
    metrics = flatten_results(results["results"])
    assert 0.0 <= metrics["tiny_yesno/exact_match"] <= 1.0 and 0.0 <= metrics["tiny_mc/acc"] <= 1.0
    assert metrics["tiny_rounds/rounds"] == 3.0
    samples = results["samples"]
    assert all(isinstance(s["filtered_resps"][0], str) for s in samples["tiny_yesno"])
    for s in samples["tiny_mc"]:  # (loss, is_greedy) per choice; the prediction is the smaller loss
        (yes, _), (no, _) = s["filtered_resps"]
        assert yes > 0 and no > 0
        assert s["acc"] == float(["yes", "no"][int(no < yes)] == s["doc"]["answer"])
    assert all(len(s["filtered_resps"][0]) == 3 for s in samples["tiny_rounds"])


def test_loglikelihood_is_the_summed_answer_loss_whatever_the_batch(models, docs):
    """Three requests of different prompt and answer lengths in one right-padded batch score what
    the model's own loss gives each alone, summed over the answer's tokens (no EOS)."""
    model, tok, tokenizer = models
    conts = [" yes", " no", " a red circle and a blue square"]
    rows = [(d["question"], c, lambda doc: [doc["image"]], i, "t", "test") for i, (d, c) in enumerate(zip(docs, conts))]
    pairs = [r.text if isinstance(r, GenerationResult) else r
             for r in _instance(models, docs, 3).loglikelihood(_requests("loglikelihood", rows))]
    for (question, cont, _, i, _, _), (loss, greedy) in zip(rows, pairs):
        tokens = tokenizer.encode(preprocess(docs[i]["image"].convert("RGB"), tokenizer.cfg.image_size)[None])
        prompt = encode_text(tok, chat_prompt(question), 64)[0]
        answer = tok(chat_answer(cont), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        chat = ChatBatch(ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor([[IGNORE] * len(prompt) + answer]))
        with torch.no_grad():
            expected = float(model(tokens, chat)) * len(answer)
        assert loss == pytest.approx(expected, rel=1e-4) and isinstance(greedy, bool)


def test_generation_is_batch_invariant_and_cut_at_stop_strings(models, docs):
    rows = [(d["question"], {"max_new_tokens": 5}, lambda doc: [doc["image"]], i, "t", "test")
            for i, d in enumerate(docs)]
    together = _instance(models, docs, 4).generate_until(_requests("generate_until", rows))
    alone = _instance(models, docs, 1).generate_until(_requests("generate_until", rows))
    assert together == alone and len(together) == 4
    assert cut("yes.\nmore", ["\n", "."]) == "yes" and cut("yes", []) == "yes" and cut("a b", ["", "x"]) == "a b"


def test_a_request_must_have_exactly_one_image(models, docs):
    rows = [(docs[0]["question"], {}, lambda doc: [doc["image"], doc["image"]], 0, "t", "test")]
    with pytest.raises(ValueError, match="exactly one image per question"):
        _instance(models, docs, 1).generate_until(_requests("generate_until", rows))


def test_offline_is_switched_on_for_the_block_only():
    import datasets.config
    import huggingface_hub.constants

    def state():
        return (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
                datasets.config.HF_DATASETS_OFFLINE, os.environ.get("HF_HUB_OFFLINE"),
                os.environ.get("HF_DATASETS_OFFLINE"))

    before = state()
    with hf_offline():
        assert state() == (True, True, True, "1", "1") and huggingface_hub.constants.is_offline_mode()
    assert state() == before


def test_the_stage_logs_every_metric_against_an_untrained_model(exports, tiny_tokenizer_path, task_folder, tmp_path):
    out = tmp_path / "lmms"
    cfg = eval_config(out, "eval.lmms.tasks=[tiny_yesno, tiny_mc]", f"eval.lmms.include_path={task_folder}",
                  "eval.lmms.batch_size=2", "eval.lmms.limit=3")
    manifest = run_eval_understanding_lmms(cfg, exports[1], str(tiny_tokenizer_path), str(out))
    assert json.loads((out / "_MANIFEST.json").read_text()) == manifest
    assert manifest["kind"] == "eval_understanding_lmms" and manifest["tasks"] == ["tiny_yesno", "tiny_mc"]
    assert manifest["lmms_eval_version"] == "0.7.3"
    assert set(manifest["inputs"]) == {"tokenizer", "understanding", "lmms_tasks"}
    m = manifest["metrics"]
    for name in ("tiny_yesno/exact_match", "tiny_mc/acc"):
        assert 0.0 <= m[name] <= 1.0 and 0.0 <= m[f"baseline/{name}"] <= 1.0

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["tokenflow.stage"] == "eval_understanding_lmms"
    logged = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}  # the driver's monitor
    assert logged.pop("stage_seconds") > 0 and logged == pytest.approx(m)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "results.parquet", "results_table.json", "lmms_results.json", "lmms_results_baseline.json"}
    assert "lmms_tasks" in {d.dataset.name for d in run.inputs.dataset_inputs}

    table = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted((r["task"], r["doc_id"]) for r in table) == [(t, i) for t in ("tiny_mc", "tiny_yesno")
                                                                for i in range(3)]
    yesno = [r for r in table if r["task"] == "tiny_yesno"]
    assert sum(json.loads(r["scores"])["exact_match"] for r in yesno) / 3 == pytest.approx(m["tiny_yesno/exact_match"])
    results = json.loads((out / "lmms_results.json").read_text())
    assert "samples" not in results and set(results["results"]) == {"tiny_yesno", "tiny_mc"}
