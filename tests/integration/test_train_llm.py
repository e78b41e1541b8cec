"""The generation and understanding stages on a real local Ray, DeepSpeed and MLflow."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import torch

from tokenflow.config import load_config
from tokenflow.data.token_shards import TokenShardError
from tokenflow.models.llm_weights import load_generator, load_understanding, read_weights
from tokenflow.models.generator import left_pad
from tokenflow.models.sampling import sample_tokens
from tokenflow.models.weights import load_tokenizer
from tokenflow.stages.train_generator import run_train_generator
from tokenflow.stages.train_understanding import run_train_understanding
from tokenflow.train.understanding_worker import ALIGNED_FILE

from tests.conftest import MODEL_CONFIGS, one_corpus
from tests.integration.conftest import TINY_LM, ProcessKiller, worker_killer

COMMON = ["micro_batch_size=4", "num_workers=2", "cpus_per_worker=1", "log_every=1", "lr=0.001",
          f"language_model.architecture={TINY_LM}", "language_model.bpe_vocab_size=400"]


def _config(stage: str, out, *extra: str):
    """The tiny config with ``stage``'s overrides, tracking into ``out``'s own MLflow store (this
    process's MLFLOW_TRACKING_URI, set by earlier tests, would otherwise take precedence)."""
    overrides = [f"{stage}.{o}" for o in COMMON + list(extra)]
    overrides.append(f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}")
    return load_config(MODEL_CONFIGS / "tokenflow-tiny.yaml", overrides)


def _data(token_shards) -> list:
    """The one-corpus mixture of the shared token shards."""
    return one_corpus(*token_shards)


def _client(out):
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    return mlflow.MlflowClient()


def test_generator_zero3_two_workers_exports_a_sampler_and_logs(ray_local, token_shards, tiny_tokenizer_path, tmp_path):
    manifest, url = token_shards
    out = tmp_path / "gen"
    cfg = _config("train_generator", out, "steps=3", "checkpoint_every=3", "eval_every=3", "deepspeed=zero3",
                  "heldout_samples=8", "sample_prompts=3", "sampling.top_k=[20, 1]", "sampling.top_p=[0.8, 0.0]")
    result = run_train_generator(cfg, _data(token_shards), str(tiny_tokenizer_path), str(out))
    model, tok = load_generator(str(out / "model"))  # ZeRO-3 partitions were gathered
    text = left_pad([[tok.bos_token_id] + tok("one red circle")["input_ids"]], tok.pad_token_id)
    tokens = sample_tokens(model, text, left_pad([[tok.bos_token_id]], tok.pad_token_id), cfg.train_generator.sampling)
    assert load_tokenizer(tiny_tokenizer_path).decode_indices(tokens).shape == (1, 3, 64, 64)

    client = _client(out)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train_generator.deepspeed"] == "zero3"
    assert run.data.tags["tokenflow.input.tokenizer"] == manifest["inputs"]["tokenizer"]
    for metric in ("loss/image_tokens", "samples_per_s", "image_tokens_per_s", "lr", "heldout/loss",
                   "heldout/unigram_entropy", "unconditional_examples"):
        assert len(client.get_metric_history(run.info.run_id, metric)) >= 1, metric
    assert len(client.get_metric_history(run.info.run_id, "loss/image_tokens")) == 3
    names = sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples"))
    assert names == ["samples/samples_step0000003.txt"]  # the prompts, whole
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any(path.startswith("images/samples+step+3+") and path.endswith(".png") for path in images)


def _history(client, run_id: str, metric: str) -> dict[int, float]:
    """Last logged value per step (a resumed worker group re-logs the steps after its checkpoint)."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp)}


def _assert_survived(straight: dict, killed: dict, killer: ProcessKiller, metric: str) -> None:
    """The killed run resumed once, from a checkpoint, to the straight run's losses and weights."""
    assert killer.killed is not None
    client = _client(killed["out"])
    expected = _history(_client(straight["out"]), straight["mlflow_run_id"], metric)
    survived = _history(client, killed["mlflow_run_id"], metric)
    assert sorted(expected) == sorted(survived)
    for step in expected:
        assert abs(expected[step] - survived[step]) <= 1e-6, (step, expected[step], survived[step])
    resumes = _history(client, killed["mlflow_run_id"], "resumed_from_step")
    assert len(resumes) == 1 and all(step == value > 0 for step, value in resumes.items()), resumes
    assert ((straight["out"] / "model" / "model.safetensors").read_bytes()
            == (killed["out"] / "model" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("stage", ["train_generator", "train_understanding"])
def test_lost_worker_restarts_the_group_from_its_checkpoint(ray_local, token_shards, tiny_tokenizer_path, tmp_path,
                                                            stage):
    """One SIGKILLed worker mid-training: Ray Train restarts the group, which resumes from the
    latest checkpoint (engines, data position, RNG) to the uninterrupted run's losses and
    export, byte for byte, and the run records it. The understanding stage's killed run starts
    from the straight run's finished align phase (a re-run skips it) and is killed in finetune."""
    manifest, url = token_shards
    run = {"train_generator": run_train_generator, "train_understanding": run_train_understanding}[stage]
    args = ("steps=24", "checkpoint_every=3", "eval_every=100", "deepspeed=zero2")
    if stage == "train_generator":  # random caption drops: the restored RNG state must replay them
        args += ("cond_drop_prob=0.5",)
    if stage == "train_understanding":
        args += ("align_steps=2", "split_turns=true", "heldout_questions=4")
    def train(out):
        data = [_data(token_shards)] * (2 if stage == "train_understanding" else 1)  # (align_data,) data
        return {**run(_config(stage, out, *args), *data, str(tiny_tokenizer_path), str(out)), "out": out}

    straight = train(tmp_path / "straight")
    if stage == "train_understanding":  # the killed run resumes after a finished align phase, as a re-run does
        (tmp_path / "killed" / "align").mkdir(parents=True)
        shutil.copy(tmp_path / "straight" / "align" / ALIGNED_FILE, tmp_path / "killed" / "align")
    killer = worker_killer(tmp_path / "killed" / "checkpoints", "finetune" if stage == "train_understanding" else "train")
    killer.start()
    killed = train(tmp_path / "killed")
    killer.join()
    metric = "loss/answer" if stage == "train_understanding" else "loss/image_tokens"
    _assert_survived(straight, killed, killer, metric)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_another_world_size_resumes_through_a_universal_checkpoint(ray_local, token_shards, tiny_tokenizer_path,
                                                                  tmp_path, zero):
    """Checkpointed by 2 workers, resumed on 1 (trains on), then on 2 again: each change of world
    size converts the checkpoint to DeepSpeed's universal form and restores the weights exactly
    (an export right after the restore equals the export of the run that saved it); the runs
    record the world size they resumed from."""
    manifest, url = token_shards
    out = tmp_path / "run"
    weights = out / "model" / "model.safetensors"

    def train(steps: int, workers: int) -> dict:
        cfg = _config("train_generator", out, f"steps={steps}", f"num_workers={workers}", "checkpoint_every=2",
                      "eval_every=100", f"deepspeed={zero}")
        return run_train_generator(cfg, _data(token_shards), str(tiny_tokenizer_path), str(out))

    train(2, 2)
    saved_by_two = weights.read_bytes()
    shrunk = train(4, 1)  # restores the 2-worker checkpoint on 1 worker, trains steps 3 and 4
    saved_by_one = weights.read_bytes()
    assert saved_by_one != saved_by_two
    grown = train(4, 2)  # restores the 1-worker checkpoint on 2 workers; nothing left to train
    assert weights.read_bytes() == saved_by_one

    client = _client(out)
    for result, step, world in ((shrunk, 2, 2), (grown, 4, 1)):
        history = _history(client, result["mlflow_run_id"], "resumed_from_world_size")
        assert history == {step: float(world)}, history
    losses = _history(client, shrunk["mlflow_run_id"], "loss/image_tokens")
    assert sorted(losses) == [3, 4] and all(0 < v < 7 for v in losses.values()), losses


def test_generator_refuses_shards_of_another_tokenizer(token_shards, tmp_path, tiny_config):
    from tokenflow.models.tokenizer import TokenFlowTokenizer
    from tokenflow.models.weights import save_tokenizer

    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    save_tokenizer(TokenFlowTokenizer(tiny_config, with_teacher=False), other)
    manifest, url = token_shards
    with pytest.raises(TokenShardError, match="did not make these token shards"):
        run_train_generator(_config("train_generator", tmp_path, "steps=1"), _data(token_shards), str(other),
                            str(tmp_path / "g"))


@pytest.mark.parametrize("align_trains,zero", [("projector", "zero3"), ("all", "zero2")])
def test_understanding_align_then_finetune_answers_questions(ray_local, token_shards, tiny_tokenizer_path, tmp_path,
                                                             align_trains, zero):
    manifest, url = token_shards
    out = tmp_path / "und"
    cfg = _config("train_understanding", out, "align_steps=2", "steps=3", "checkpoint_every=3", "eval_every=3",
                  f"deepspeed={zero}", "split_turns=true", "heldout_questions=6", "max_new_tokens=3",
                  f"align_trains={align_trains}")
    result = run_train_understanding(cfg, _data(token_shards), _data(token_shards), str(tiny_tokenizer_path), str(out))
    aligned, _ = read_weights(str(out / "align" / "aligned.safetensors"))
    trained_lm = any(k.startswith("lm.") for k in aligned)
    assert any(k.startswith("projector.") for k in aligned) and trained_lm == (align_trains == "all")
    model, tok = load_understanding(str(out / "model"))
    answers = model.generate(torch.zeros(2, 130, dtype=torch.long), ["Is there a red circle?", "Is it blue?"], tok,
                             max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    client = _client(out)
    run_id = result["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "align/loss/answer")) == 2
    assert len(client.get_metric_history(run_id, "loss/answer")) == 3
    for metric in ("heldout/yes_no_accuracy", "heldout/majority_rate", "heldout/unparsed_rate"):
        history = client.get_metric_history(run_id, metric)
        assert len(history) == 1 and 0.0 <= history[0].value <= 1.0, metric
