"""MME: both directory layouts of the release, answer parsing, accuracy+ and totals, shapes set."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from tokenflow.data.corpus import RawSample
from tokenflow.data.shapes import annotate, encode_png, generate_scene, render_scene
from tokenflow.eval.mme import (COGNITION_SUBTASKS, PERCEPTION_SUBTASKS, MMEQuestion, load_mme, parse_answer,
                                score_mme)
from tokenflow.eval.shapes_mme import write_shapes_mme


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "red").save(path)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def release(tmp_path) -> Path:
    """A tiny copy of the MME_Benchmark_release_version layout (both forms, plus noise)."""
    root = tmp_path / "MME_Benchmark_release_version"
    _png(root / "existence" / "000000006040.jpg")
    _write(root / "existence" / "000000006040.txt",
           "Is there a train in this image? Please answer yes or no.\tYes\n"
           "Is there a bed in this image? Please answer yes or no.\tNo\n\n")
    _png(root / "artwork" / "images" / "10002.jpg")
    _write(root / "artwork" / "questions_answers_YN" / "10002.txt",
           "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
           "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n")
    _png(root / "code_reasoning" / "0020.png")
    _write(root / "code_reasoning" / "0020.txt", "Is the output 3? Please answer yes or no.\tyes\n"
                                                 "Is the output 4? Please answer yes or no.\tno\n")
    _write(root / "eval_tool" / "readme.txt", "not a subtask\n")
    return root


def test_loader_reads_flat_and_split_subtasks(release):
    questions = load_mme(str(release))
    assert [(q.subtask, Path(q.image).name, q.answer) for q in questions] == [
        ("existence", "000000006040.jpg", "yes"), ("existence", "000000006040.jpg", "no"),
        ("artwork", "10002.jpg", "yes"), ("artwork", "10002.jpg", "no"),
        ("code_reasoning", "0020.png", "yes"), ("code_reasoning", "0020.png", "no")]
    assert questions[0].question == "Is there a train in this image? Please answer yes or no."
    assert Path(questions[2].image) == release / "artwork" / "images" / "10002.jpg"


def test_loader_rejects_missing_images_and_bad_lines(release, tmp_path):
    _write(release / "count" / "0001.txt", "How many? Please answer yes or no.\tYes\n")
    with pytest.raises(ValueError, match="no image named 0001"):
        load_mme(str(release))
    _png(release / "count" / "0001.jpg")
    _write(release / "count" / "0001.txt", "How many?\tmaybe\n")
    with pytest.raises(ValueError, match="0001.txt:1"):
        load_mme(str(release))
    with pytest.raises(FileNotFoundError):
        load_mme(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("reply, parsed", [
    ("Yes", "yes"), ("no", "no"), ("  YES  ", "yes"), ("Yes.", "yes"), ("No, there is none.", "no"),
    ("yes, it is", "yes"), ("Nope", "no"), ("Not sure", "no"), ("I think yes", "other"), ("", "other"),
    ("Maybe", "other"),
])
def test_answer_parsing_follows_the_mme_tool(reply, parsed):
    assert parse_answer(reply) == parsed


def test_accuracy_plus_and_totals_on_a_hand_built_table():
    def q(subtask: str, image: str, answer: str) -> MMEQuestion:
        return MMEQuestion(subtask, image, "?", answer)

    table = [  # (question, model reply)
        (q("existence", "e1", "yes"), "Yes"), (q("existence", "e1", "no"), "No"),
        (q("existence", "e2", "yes"), "Yes"), (q("existence", "e2", "no"), "Yes"),
        (q("existence", "e3", "yes"), "yes."), (q("existence", "e3", "no"), "no"),
        (q("count", "c1", "yes"), "Yes"), (q("count", "c1", "no"), "No"),
        (q("code_reasoning", "r1", "no"), "It depends"), (q("code_reasoning", "r1", "yes"), "Yes"),
    ]
    scores = score_mme([t[0] for t in table], [t[1] for t in table])
    existence = scores.subtasks["existence"]
    assert existence.accuracy == pytest.approx(5 / 6) and existence.accuracy_plus == pytest.approx(2 / 3)
    assert existence.score == pytest.approx(150.0) and (existence.num_questions, existence.num_images) == (6, 3)
    assert scores.subtasks["count"].score == pytest.approx(200.0)
    assert scores.subtasks["code_reasoning"].score == pytest.approx(50.0)
    assert scores.perception == pytest.approx(350.0) and scores.cognition == pytest.approx(50.0)
    assert set(scores.missing) == (set(PERCEPTION_SUBTASKS) | set(COGNITION_SUBTASKS)) - {
        "existence", "count", "code_reasoning"}
    assert scores.metrics()["existence/accuracy_plus"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_mme([t[0] for t in table], ["Yes"])
    with pytest.raises(ValueError, match="unknown MME subtask"):
        score_mme([q("shapes", "x", "yes")], ["yes"])


def test_shapes_set_round_trips_through_the_loader():
    rng = np.random.default_rng(0)
    samples, records = [], {}
    for i in range(60):
        scene = generate_scene(rng, 64)
        record = annotate(scene, rng)
        key = f"shapes-{i:08d}"
        records[key] = (record, render_scene(scene, 64))
        samples.append(RawSample(key, encode_png(render_scene(scene, 64)), json=json.dumps(record)))
    url = "memory://mme-test/shapes"
    written = write_shapes_mme(url, samples, per_subtask=4)
    assert written == {"existence": 4, "count": 4, "color": 4, "position": 4}

    questions = load_mme(url)
    assert len(questions) == 2 * sum(written.values())
    for q in questions:
        key = q.image.rsplit("/", 1)[-1].removesuffix(".png")
        record, image = records[key]
        assert q.subtask == record["questions"][0]["type"]
        assert q.question.removesuffix(" Please answer yes or no.") in [r["question"] for r in record["questions"]]
        assert q.answer == next(r["answer"] for r in record["questions"]
                                if q.question.startswith(r["question"]))
        with fsspec.open(q.image, "rb") as f:
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB")), np.asarray(image))
    perfect = score_mme(questions, [q.answer.capitalize() for q in questions])
    assert perfect.perception == pytest.approx(800.0) and perfect.cognition == 0.0
