"""POPE: the release files (JSON lines and arrays, hostile lines), the official reading of replies,
metrics per split, the shapes set's splits, and the config section."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from tokenflow.config import ConfigError, load_config
from tokenflow.data.corpus import RawSample
from tokenflow.data.shapes import annotate, encode_png, generate_scene, render_scene
from tokenflow.eval.pope import POPEQuestion, answer_to, is_explicit, load_pope, read_reply, score_pope, score_split
from tokenflow.eval.shapes_pope import (CLASSES, IMAGES_DIR, PAIRS_PER_IMAGE, SHAPES_FILES, build_splits,
                                        question_text, scene_classes, write_shapes_pope)

from tests.conftest import MODEL_CONFIGS


def _lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _q(qid: int, label: str, image: str = "COCO_val2014_000000310196.jpg", text: str = "Is there a car in the image?"):
    return {"question_id": qid, "image": image, "text": text, "label": label}


@pytest.fixture
def release(tmp_path) -> Path:
    """The three COCO split files (JSON lines) and an image root."""
    root = tmp_path / "pope"
    root.mkdir()
    (tmp_path / "val2014").mkdir()
    (root / "coco_pope_random.json").write_text(_lines(_q(1, "yes"), _q(2, "no")) + "\n")
    (root / "coco_pope_popular.json").write_text(_lines(_q(1, "Yes"), _q(2, "no", "sub/COCO_2.jpg")))
    (root / "coco_pope_adversarial.json").write_text(_lines(_q(7, "no")))
    return root


def test_loader_reads_the_three_split_files(release):
    questions = load_pope(str(release), str(release.parent / "val2014"))
    assert [(q.split, q.question_id, q.label) for q in questions] == [
        ("random", 1, "yes"), ("random", 2, "no"), ("popular", 1, "yes"), ("popular", 2, "no"),
        ("adversarial", 7, "no")]
    assert questions[0].image == str(release.parent / "val2014" / "COCO_val2014_000000310196.jpg")
    assert questions[3].image.endswith("val2014/sub/COCO_2.jpg")
    assert questions[0].question == "Is there a car in the image?"


def test_loader_reads_the_json_array_form_of_the_seem_releases(release):
    for split in ("random", "popular", "adversarial"):
        (release / f"gqa_pope_seem_{split}.json").write_text(json.dumps([_q(1, "yes", "2405722.jpg")], indent=4))
    questions = load_pope(str(release), str(release.parent / "val2014"), "gqa_pope_seem_{split}.json")
    assert [(q.split, q.image.rsplit("/", 1)[1]) for q in questions] == [
        ("random", "2405722.jpg"), ("popular", "2405722.jpg"), ("adversarial", "2405722.jpg")]


FIRST = _lines(_q(1, "yes"))


@pytest.mark.parametrize("content, problem", [
    (FIRST + "[" * 40 + "]" * 40, "line 2: json_too_deep"),
    (FIRST + '{"question_id": 3, "image": "x.jpg"', "line 2: json_invalid"),
    (FIRST + json.dumps(_q(3, "maybe")), "label 'maybe' is neither yes nor no"),
    (FIRST + json.dumps(_q(3, "no", "../../etc/passwd")), "not a relative path of plain names"),
    (FIRST + json.dumps(_q(3, "no", "/abs.jpg")), "not a relative path of plain names"),
    (FIRST + json.dumps(_q(3, "no", "s3://bucket/x.jpg")), "not a relative path of plain names"),
    (FIRST + json.dumps({**_q(3, "no"), "extra": 1}), "keys"),
    (FIRST + json.dumps({**_q(3, "no"), "question_id": True}), "'question_id' must be int"),
    (FIRST + json.dumps(_q(1, "no")), "line 2: question_id 1 appears twice"),
    ("[1, 2]", "entry 0: a JSON int, not an object"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
])
def test_a_hostile_file_fails_naming_file_and_line(release, content, problem):
    target = release / "coco_pope_random.json"
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match="coco_pope_random.json") as err:
        load_pope(str(release), str(release.parent / "val2014"))
    assert problem in str(err.value)


def test_loader_refuses_missing_files_and_roots(release, tmp_path):
    with pytest.raises(FileNotFoundError, match="image root"):
        load_pope(str(release), str(tmp_path / "nowhere"))
    (release / "coco_pope_adversarial.json").unlink()
    with pytest.raises(FileNotFoundError, match="coco_pope_adversarial.json"):
        load_pope(str(release), str(release.parent / "val2014"))
    (release / "coco_pope_adversarial.json").write_text("\n\n")
    with pytest.raises(ValueError, match="no questions"):
        load_pope(str(release), str(release.parent / "val2014"))


@pytest.mark.parametrize("reply, read, explicit", [
    ("Yes", "yes", True), ("No", "no", True), ("no", "no", True), ("yes.", "yes", True), ("Yes!", "yes", True),
    ("No, there is none.", "no", True), ("There is not a car", "no", True), ("I see no car", "no", True),
    ("Yes. But no car.", "yes", True),  # only the first sentence counts
    ("Yes, there is no doubt", "no", True),  # a negative word anywhere in it wins, as in the tool
    ("NO", "yes", False), ("Not at all", "yes", False), ("Nope", "yes", False), ("no!", "yes", False),
    ("", "yes", False), ("car car", "yes", False),
])
def test_replies_are_read_as_popes_evaluate_py_reads_them(reply, read, explicit):
    assert read_reply(reply) == read
    assert is_explicit(reply) == explicit


def test_no_reply_scores_wrong_not_as_the_empty_replys_yes():
    yes, no = POPEQuestion("random", 1, "i", "?", "yes"), POPEQuestion("random", 2, "i", "?", "no")
    assert (answer_to(yes, None), answer_to(no, None)) == ("no", "yes")
    assert answer_to(yes, "") == "yes" and not is_explicit(None)
    scores = score_pope([yes, no], [None, None])
    assert scores.splits["random"].accuracy == 0.0 and scores.unparsed_rate == 1.0


def test_metrics_on_a_hand_built_answer_table():
    table = {  # split: [(label, reply)]
        "random": [("yes", "Yes"), ("yes", "No"), ("yes", "yes"), ("no", "Yes"), ("no", "No"), ("no", "no.")],
        "popular": [("yes", "Yes"), ("no", "Yes"), ("yes", ""), ("no", "Yes")],  # TP 2, FP 2: all yes
        "adversarial": [("yes", "No"), ("no", "No")],  # nothing read yes: precision 0 by convention
    }
    questions = [POPEQuestion(split, i, f"img{i // 2}", "?", label)
                 for split, rows in table.items() for i, (label, _) in enumerate(rows)]
    replies = [reply for rows in table.values() for _, reply in rows]
    scores = score_pope(questions, replies)
    r, p, a = scores.splits["random"], scores.splits["popular"], scores.splits["adversarial"]
    assert (r.accuracy, r.precision, r.recall, r.f1, r.yes_ratio) == pytest.approx((4 / 6, 2 / 3, 2 / 3, 2 / 3, 0.5))
    assert (p.accuracy, p.precision, p.recall, p.f1, p.yes_ratio) == pytest.approx((0.5, 0.5, 1.0, 2 / 3, 1.0))
    assert (a.accuracy, a.precision, a.recall, a.f1, a.yes_ratio) == pytest.approx((0.5, 0.0, 0.0, 0.0, 0.0))
    m = scores.metrics()
    assert m["random/f1"] == pytest.approx(2 / 3) and m["adversarial/yes_ratio"] == 0.0
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3) and m["accuracy"] == pytest.approx((4 / 6 + 0.5 + 0.5) / 3)
    assert m["yes_ratio"] == pytest.approx(0.5) and m["num_questions"] == 12
    assert m["unparsed_rate"] == pytest.approx(1 / 12)  # the empty reply, read "yes"
    assert score_split(["yes", "no"], ["no", "no"]).recall == 0.0
    with pytest.raises(ValueError):
        score_pope(questions, replies[:-1])
    with pytest.raises(ValueError, match="unknown POPE split"):
        score_pope([POPEQuestion("hard", 1, "i", "?", "no")], ["no"])


def test_hand_built_splits_follow_frequency_and_co_occurrence():
    images = [("a.png", ("red circle", "blue square", "green triangle")),
              ("b.png", ("red circle", "blue square", "yellow circle")),
              ("c.png", ("purple square", "yellow circle", "orange triangle"))]
    splits = build_splits(images, seed=0)

    def negatives(split: str, image: str) -> list[str]:
        return [r["text"] for r in splits[split] if r["image"] == image and r["label"] == "no"]

    # popular: red circle, blue square, yellow circle (2 images each), then green triangle, purple
    # square, orange triangle (1 each), ties in class order
    assert negatives("popular", "a.png") == [question_text(c) for c in
                                             ("yellow circle", "purple square", "orange triangle")]
    assert negatives("popular", "c.png") == [question_text(c) for c in ("red circle", "blue square", "green triangle")]
    # adversarial: red circle's partners are blue square (2), green triangle, yellow circle (1):
    # the first absent one is yellow circle; blue square's and green triangle's are all used up
    # (random); in c, yellow circle's partners red circle, blue square, purple square, orange
    # triangle (1 each): red circle
    adversarial_a, adversarial_c = negatives("adversarial", "a.png"), negatives("adversarial", "c.png")
    assert adversarial_a[0] == question_text("yellow circle") and adversarial_c[1] == question_text("red circle")
    for split, records in splits.items():
        assert [r["question_id"] for r in records] == list(range(1, 19))
        assert [r["label"] for r in records] == ["yes", "no"] * 9
        for name, present in images:
            asked = [r["text"] for r in records if r["image"] == name]
            assert len(set(asked)) == 6 and {question_text(c) for c in present} <= set(asked)
            assert not {question_text(c) for c in present} & set(negatives(split, name))
    assert build_splits(images, seed=0) == splits
    assert question_text("orange square") == "Is there an orange square in the image?"
    with pytest.raises(ValueError, match="needs 3 distinct known classes"):
        build_splits([("d.png", ("red circle", "red circle", "blue square"))], seed=0)


def _samples(n: int) -> tuple[list[RawSample], dict[str, dict]]:
    rng = np.random.default_rng(0)
    samples, records = [], {}
    for i in range(n):
        scene = generate_scene(rng, 64)
        record = annotate(scene, rng)
        key = f"shapes-{i:08d}"
        records[key] = record
        samples.append(RawSample(key, encode_png(render_scene(scene, 64)), json=json.dumps(record)))
    return samples, records


def test_shapes_set_is_balanced_absent_negatives_and_reads_back(tmp_path):
    samples, records = _samples(200)
    samples.insert(0, RawSample("broken", encode_png(render_scene(generate_scene(np.random.default_rng(1)))),
                                json='{"objects": [{"shape": "hexagon", "color": "red"}]}'))
    url = str(tmp_path / "shapes-pope")
    assert write_shapes_pope(url, samples, num_images=20, seed=3) == 20
    questions = load_pope(url, f"{url}/{IMAGES_DIR}", SHAPES_FILES)
    frequency = Counter()
    present_of: dict[str, set[str]] = {}
    for q in questions:
        key = q.image.rsplit("/", 1)[1].removesuffix(".png")
        present_of[q.image] = {f"{o['color']} {o['shape']}" for o in records[key]["objects"]}
    for present in present_of.values():
        frequency.update(present)
    assert len(present_of) == 20 and all(len(p) >= PAIRS_PER_IMAGE for p in present_of.values())

    by_image: dict[tuple[str, str], list[POPEQuestion]] = defaultdict(list)
    for q in questions:
        by_image[(q.split, q.image)].append(q)
    positives = {}
    for (split, image), asked in by_image.items():
        labels = Counter(q.label for q in asked)
        assert labels == {"yes": 3, "no": 3} and len({q.question for q in asked}) == 6
        absent = [c for c in CLASSES if c not in present_of[image]]
        no = [c for c in CLASSES if question_text(c) in {q.question for q in asked if q.label == "no"}]
        assert set(no) <= set(absent)
        positives.setdefault(image, {q.question for q in asked if q.label == "yes"})
        assert positives[image] == {q.question for q in asked if q.label == "yes"}  # same in every split
        if split == "popular":  # the 3 most frequent absent classes
            ranked = sorted(absent, key=lambda c: (-frequency[c], CLASSES.index(c)))
            assert set(no) == set(ranked[:3])

    before = {p.name: p.read_bytes() for p in Path(url).glob("*.json")}
    write_shapes_pope(url, samples, num_images=20, seed=3)
    assert {p.name: p.read_bytes() for p in Path(url).glob("*.json")} == before  # deterministic
    write_shapes_pope(url, samples, num_images=20, seed=4)
    after = {p.name: p.read_bytes() for p in Path(url).glob("*.json")}
    assert after["shapes_pope_random.json"] != before["shapes_pope_random.json"]
    assert after["shapes_pope_popular.json"] == before["shapes_pope_popular.json"]


def test_scene_classes_and_too_few_eligible_samples(tmp_path):
    record = {"objects": [{"shape": "circle", "color": "red"}, {"shape": "square", "color": "blue"},
                          {"shape": "circle", "color": "red"}]}
    assert scene_classes(json.dumps(record)) == ("red circle", "blue square")
    with pytest.raises(ValueError, match="not a shapes object"):
        scene_classes('{"objects": [{"shape": "circle"}]}')
    one = RawSample("one", b"png", json=json.dumps({"objects": record["objects"][:1]}))
    with pytest.raises(ValueError, match="no held-out shapes sample has 3 object classes"):
        write_shapes_pope(str(tmp_path / "p"), [one], num_images=5, seed=0)


def test_pope_config_needs_its_data_and_a_split_pattern():
    tiny = MODEL_CONFIGS / "tokenflow-tiny.yaml"
    assert load_config(tiny).eval.pope.benchmark == "shapes"
    with pytest.raises(ConfigError, match=r"eval\.pope: benchmark pope needs root_url, image_root_url"):
        load_config(tiny, ["eval.pope.benchmark=pope"])
    with pytest.raises(ConfigError, match=r"eval\.pope: files must be a file name holding \{split\} once"):
        load_config(tiny, ["eval.pope.files=coco_pope.json"])
    cfg = load_config(tiny, ["eval.pope.benchmark=pope", "eval.pope.root_url=s3://b/pope",
                             "eval.pope.image_root_url=s3://b/val2014", "eval.pope.files=gqa_pope_seem_{split}.json"])
    assert cfg.eval.pope.files.format(split="random") == "gqa_pope_seem_random.json"
