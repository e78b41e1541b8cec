"""GenEval: metadata format, the official scoring rules on hand-built detections, aggregation,
and the shapes backend + shapes prompt set end to end."""

from __future__ import annotations

import json
from collections import Counter
from typing import Sequence

import fsspec
import numpy as np
import pytest
from PIL import Image

from tokenflow.data.corpus import RawSample
from tokenflow.data.shapes import PALETTE, Scene, SceneObject, annotate, generate_scene, render_scene
from tokenflow.eval.geneval import (TAGS, Detection, as_bbox, Exclude, GenEvalPrompt, GenEvalRules, ImageResult,
                                    Include, box_iou, evaluate_detections, keep_detections, load_metadata,
                                    relative_position, score_image, summarize, write_metadata)
from tokenflow.eval.geneval_backends import ShapesColorClassifier, ShapesObjectDetector
from tokenflow.eval.shapes_geneval import (prompts_for_scene, scene_from_record, shapes_geneval_prompts,
                                           write_shapes_geneval_prompts)

# Lines in the official evaluation_metadata.jsonl format.
OFFICIAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}], '
    '"prompt": "a photo of three buses"}',
    '{"tag": "position", "include": [{"class": "skateboard", "count": 1}, {"class": "bird", "count": 1, '
    '"position": ["below", 0]}], "prompt": "a photo of a bird below a skateboard"}',
    '{"tag": "color_attr", "include": [{"class": "tennis racket", "count": 1, "color": "purple"}, '
    '{"class": "sink", "count": 1, "color": "black"}], "prompt": "a photo of a purple tennis racket and a black sink"}',
]
BLANK = Image.new("RGB", (64, 64), "white")


class FieldColor:
    """Colour classifier stand-in: the colour written on the detection."""

    def classify(self, image: Image.Image, detection: Detection, colors: Sequence[str]) -> str:
        return detection.color


def _det(label: str, score: float, bbox=(0, 0, 10, 10), color: str | None = None) -> Detection:
    return Detection(label, score, as_bbox(bbox), color)


def _judge(prompt: GenEvalPrompt, detections: list[Detection], rules: GenEvalRules = GenEvalRules()):
    kept = keep_detections(detections, prompt.tag, rules)
    return evaluate_detections(BLANK, kept, prompt, FieldColor(), rules)


def test_official_metadata_lines_parse_and_round_trip():
    url = "memory://geneval-test/official.jsonl"
    with fsspec.open(url, "w") as f:
        f.write("\n".join(OFFICIAL_LINES) + "\n\n")
    prompts = load_metadata(url)
    assert [p.tag for p in prompts] == ["single_object", "counting", "position", "color_attr"]
    assert prompts[1].include == (Include("bus", 3),) and prompts[1].exclude == (Exclude("bus", 4),)
    assert prompts[2].include[1] == Include("bird", 1, position=("below", 0))
    assert prompts[3].include[0] == Include("tennis racket", 1, "purple")
    write_metadata("memory://geneval-test/copy.jsonl", prompts)
    assert load_metadata("memory://geneval-test/copy.jsonl") == prompts
    assert [json.loads(line) for line in OFFICIAL_LINES] == [p.to_json() for p in prompts]


@pytest.mark.parametrize("record", [
    {"tag": "x", "prompt": "p", "include": [], "extra": 1},
    {"tag": "x", "prompt": "p", "include": [{"class": "a", "count": 1, "position": ["left of", 0]}]},
    {"tag": "x", "prompt": "p", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1,
                                                                          "position": ["near", 0]}]},
    {"tag": "x", "include": [{"class": "a", "count": 1}]},
])
def test_malformed_metadata_is_rejected(record):
    url = "memory://geneval-test/bad.jsonl"
    with fsspec.open(url, "w") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_metadata(url)


def test_thresholds_are_strict_and_counting_uses_the_higher_one():
    dets = [_det("dog", 0.3), _det("dog", 0.31), _det("cat", 0.9), _det("cat", 0.95)]
    assert [d.score for d in keep_detections(dets, "single_object")["dog"]] == [0.31]
    counting = keep_detections(dets, "counting")
    assert "dog" not in counting and [d.score for d in counting["cat"]] == [0.95]


def test_counting_with_the_strict_threshold_and_the_exclude_clause():
    prompt = GenEvalPrompt("counting", "three buses", (Include("bus", 3),), (Exclude("bus", 4),))
    three = [_det("bus", 0.95, (20 * i, 0, 20 * i + 10, 10)) for i in range(3)]
    assert _judge(prompt, three + [_det("bus", 0.85)]) == (True, "")  # 0.85 is below 0.9
    correct, reason = _judge(prompt, three + [_det("bus", 0.92)])
    assert not correct and "fewer than 4 bus, found 4" in reason
    correct, reason = _judge(prompt, three[:2] + [_det("bus", 0.9)])  # 0.9 is not above 0.9
    assert not correct and "expected 3 bus, found 2" in reason


def test_excludes_are_ored_and_count_all_kept_objects():
    prompt = GenEvalPrompt("two_object", "a cat and a dog", (Include("cat", 1), Include("dog", 1)),
                           (Exclude("car", 1), Exclude("person", 2)))
    base = [_det("cat", 0.8), _det("dog", 0.8)]
    assert _judge(prompt, base + [_det("person", 0.9)])[0]
    assert not _judge(prompt, base + [_det("person", 0.9), _det("person", 0.5)])[0]
    assert not _judge(prompt, base + [_det("car", 0.4)])[0]
    assert _judge(prompt, base + [_det("car", 0.2)])[0]


def test_max_objects_per_class_caps_what_is_counted():
    many = [_det("apple", 0.5 + i / 100) for i in range(20)]
    kept = keep_detections(many, "single_object")["apple"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.69) and kept[-1].score == pytest.approx(0.54)
    prompt = GenEvalPrompt("single_object", "an apple", (Include("apple", 1),), (Exclude("apple", 17),))
    assert _judge(prompt, many)[0]
    assert not _judge(prompt, many, GenEvalRules(max_objects=17))[0]


def test_nms_uses_inclusive_iou_and_is_off_by_default():
    a, b = (0, 0, 9, 9), (5, 0, 14, 9)  # 10x10 pixel boxes overlapping by 5 columns
    assert box_iou(a, b) == pytest.approx(50 / 150)
    dets = [_det("dog", 0.9, a), _det("dog", 0.8, b), _det("dog", 0.7, (40, 40, 49, 49))]
    assert len(keep_detections(dets, "single_object")["dog"]) == 3
    kept = keep_detections(dets, "single_object", GenEvalRules(max_overlap=0.3))["dog"]
    assert [d.score for d in kept] == [0.9, 0.7]


def test_relative_position_margin_scales_with_object_size():
    ref = (0, 0, 10, 10)
    assert relative_position((12, 0, 22, 10), ref) == {"right of"}
    assert relative_position((-12, 0, -2, 10), ref) == {"left of"}
    assert relative_position((0, 12, 10, 22), ref) == {"below"}
    assert relative_position((0, -12, 10, -2), ref) == {"above"}
    # Centre offset 3, margin 0.1 * (10 + 10) = 2: shrunk to 1, and 1/3 is not beyond 0.5.
    assert relative_position((3, 0, 13, 10), ref) == set()
    # Offset 2 is inside the margin of 2: nothing left at all.
    assert relative_position((2, 0, 12, 10), ref) == set()
    # Diagonal: both axes pass.
    assert relative_position((10, 10, 20, 20), ref) == {"right of", "below"}
    # Bigger objects need a bigger gap: same centre offset 12, sizes 30 -> margin 6, 6/12 is not > 0.5.
    assert relative_position((-3, -10, 27, 20), (-15, -10, 15, 20)) == set()


def test_position_clause_checks_every_pair_and_needs_its_target():
    prompt = GenEvalPrompt("position", "a bird below a skateboard",
                           (Include("skateboard", 1), Include("bird", 1, position=("below", 0))))
    board = _det("skateboard", 0.9, (0, 0, 10, 10))
    assert _judge(prompt, [board, _det("bird", 0.9, (0, 20, 10, 30))]) == (True, "")
    correct, reason = _judge(prompt, [board, _det("bird", 0.9, (20, 0, 30, 10))])
    assert not correct and "expected bird below skateboard, found right of" in reason
    # Only the most confident bird (count 1) is checked.
    assert _judge(prompt, [board, _det("bird", 0.9, (0, 20, 10, 30)), _det("bird", 0.5, (0, -30, 10, -20))])[0]
    correct, reason = _judge(prompt, [_det("bird", 0.9, (0, 20, 10, 30))])
    assert not correct and "expected 1 skateboard, found 0" in reason and "no target for bird" in reason


def test_colour_attribution_checks_the_most_confident_objects_only():
    prompt = GenEvalPrompt("color_attr", "a red dog and a blue cat",
                           (Include("dog", 1, "red"), Include("cat", 1, "blue")))
    assert _judge(prompt, [_det("dog", 0.9, color="red"), _det("cat", 0.8, color="blue")]) == (True, "")
    correct, reason = _judge(prompt, [_det("dog", 0.9, color="blue"), _det("dog", 0.8, color="red"),
                                      _det("cat", 0.8, color="blue")])
    assert not correct and "expected 1 red dog" in reason
    two = GenEvalPrompt("colors", "two green apples", (Include("apple", 2, "green"),))
    assert not _judge(two, [_det("apple", 0.9, color="green"), _det("apple", 0.8, color="red")])[0]


def test_summary_is_the_mean_of_per_tag_accuracies():
    results = [ImageResult("counting", "p", c, "") for c in (True, False, False, False)]
    results += [ImageResult("colors", "q", True, "")] * 2
    summary = summarize(results)
    assert summary.per_tag == {"counting": 0.25, "colors": 1.0}
    assert summary.overall == pytest.approx(0.625) and summary.num_images == 6
    assert summary.metrics() == {"overall": 0.625, "num_images": 6.0, "counting/accuracy": 0.25,
                                 "colors/accuracy": 1.0}


def _scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [generate_scene(rng, 64) for _ in range(n)]


def test_shapes_backend_accepts_every_scene_for_its_own_prompts():
    detector, colors = ShapesObjectDetector(), ShapesColorClassifier()
    tags = Counter()
    for scene in _scenes(80):
        image = render_scene(scene, 64)
        for tag, prompt in prompts_for_scene(scene).items():
            result = score_image(image, prompt, detector, colors)
            assert result.correct, (prompt, result.reason)
            tags[tag] += 1
    assert set(tags) == set(TAGS)


def test_shapes_backend_rejects_wrong_images():
    detector, colors = ShapesObjectDetector(), ShapesColorClassifier()
    scenes = [s for s in _scenes(200, seed=1) if {"position", "color_attr"} <= set(prompts_for_scene(s))]
    scene = scenes[0]
    prompts = prompts_for_scene(scene)
    first_only = render_scene(Scene(scene.objects[:1]), 64)
    assert not score_image(first_only, prompts["two_object"], detector, colors).correct
    a, b = scene.objects
    recoloured = Scene(tuple(SceneObject(o.shape, next(c for c in PALETTE if c != o.color), o.bbox, o.center)
                             for o in (a, b)))
    assert not score_image(render_scene(recoloured, 64), prompts["color_attr"], detector, colors).correct
    swapped = Scene((SceneObject(a.shape, a.color, b.bbox, b.center), SceneObject(b.shape, b.color, a.bbox, a.center)))
    assert not score_image(render_scene(swapped, 64), prompts["position"], detector, colors).correct


def test_shapes_prompt_set_is_balanced_distinct_and_official_format():
    rng = np.random.default_rng(2)
    samples = []
    for i in range(400):
        scene = generate_scene(rng, 64)
        samples.append(RawSample(f"k{i}", b"", json=json.dumps(annotate(scene, rng))))
    url = "memory://geneval-test/shapes.jsonl"
    prompts = [prompt for _, prompt in write_shapes_geneval_prompts(url, samples, per_tag=5)]
    assert load_metadata(url) == prompts
    per_tag = Counter(p.tag for p in prompts)
    assert per_tag == {tag: 5 for tag in TAGS}
    assert [p.tag for p in prompts] == sorted((p.tag for p in prompts), key=TAGS.index)
    for tag in TAGS:
        texts = [p.prompt for p in prompts if p.tag == tag]
        assert len(set(texts)) == len(texts)
    counting = [p for p in prompts if p.tag == "counting"]
    assert all(p.exclude == (Exclude(p.include[0].cls, p.include[0].count + 1),) for p in counting)
    assert all(p.include[0].count >= 2 for p in counting)
    positions = [p for p in prompts if p.tag == "position"]
    assert all(p.include[1].position[0] in p.prompt for p in positions)
    write_shapes_geneval_prompts("memory://geneval-test/again.jsonl", samples, per_tag=5)
    assert fsspec.open("memory://geneval-test/again.jsonl", "rb").open().read() == \
        fsspec.open(url, "rb").open().read()
    assert shapes_geneval_prompts([scene_from_record(json.loads(samples[0].json))], 1) == \
        list(prompts_for_scene(scene_from_record(json.loads(samples[0].json))).values())[:1]


def test_each_prompt_comes_with_the_sample_whose_scene_it_was_written_from():
    rng = np.random.default_rng(3)
    samples, scenes = [], {}
    for i in range(200):
        scene = generate_scene(rng, 64)
        scenes[f"k{i}"] = scene
        samples.append(RawSample(f"k{i}", b"", json=json.dumps(annotate(scene, rng))))
    sourced = write_shapes_geneval_prompts("memory://geneval-test/sourced.jsonl", samples, per_tag=3)
    assert [p for _, p in sourced] == shapes_geneval_prompts(scenes.values(), per_tag=3)
    detector, colors = ShapesObjectDetector(), ShapesColorClassifier()
    for source, prompt in sourced:
        assert prompts_for_scene(scenes[source.key])[prompt.tag] == prompt
        assert score_image(render_scene(scenes[source.key], 64), prompt, detector, colors).correct


def test_geneval_folder_layout_round_trip_and_missing_images_score_zero(tmp_path):
    """The stage's images in the official layout (<NNNNN>/metadata.jsonl, samples/<NNNN>.png),
    scored back from the files; a missing or undecodable image and a failed prompt score 0."""
    from tokenflow.eval.geneval_layout import image_url, read_prompt, write_prompt
    from tokenflow.eval.runners import score_generated

    rng = np.random.default_rng(3)
    scene = generate_scene(rng)
    prompts = list(prompts_for_scene(scene).values())[:1] + shapes_geneval_prompts(
        (generate_scene(rng) for _ in range(50)), 1)[:2]
    picture = np.asarray(render_scene(scene))
    outdir = str(tmp_path / "images")
    write_prompt(outdir, 0, prompts[0], [picture, picture])
    write_prompt(outdir, 2, prompts[2], [picture, picture])
    assert sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*")
                  if p.is_file()) == ["00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
                                      "00002/metadata.jsonl", "00002/samples/0000.png", "00002/samples/0001.png"]
    assert read_prompt(outdir, 0) == prompts[0]
    assert json.loads((tmp_path / "images/00000/metadata.jsonl").read_text()) == prompts[0].to_json()
    assert image_url(outdir, 2, 1) == str(tmp_path / "images/00002/samples/0001.png")
    (tmp_path / "images/00002/samples/0001.png").write_bytes(b"junk")

    detector, classifier = ShapesObjectDetector(), ShapesColorClassifier()
    scored = score_generated(outdir, prompts, 2, {1: "RuntimeError: boom"}, detector, classifier, GenEvalRules())
    assert [(g.prompt_index, g.index, g.failed) for g in scored] == [(0, 0, False), (0, 1, False), (1, 0, True),
                                                                     (1, 1, True), (2, 0, False), (2, 1, True)]
    assert scored[0].result.correct and scored[1].result.correct  # the scene's own prompt, judged from its PNG
    assert scored[2].result.reason == "generation failed: RuntimeError: boom"
    assert scored[5].result.reason.startswith("image 1: ") and not scored[5].result.correct
    (tmp_path / "images/00000/samples/0001.png").unlink()
    assert score_generated(outdir, prompts[:1], 2, {}, detector, classifier, GenEvalRules())[1].result.reason == \
        "image 1: missing"
    with pytest.raises(ValueError, match="another prompt"):
        score_generated(outdir, [prompts[1]], 2, {}, detector, classifier, GenEvalRules())
