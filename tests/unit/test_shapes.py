"""The procedural `shapes` corpus (writer, captions, questions) and its exact detector."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFilter

from tokenflow.data.shapes import (BACKGROUND, PALETTE, SHAPES, annotate, caption, generate_scene,
                                   render_scene, write_shapes_corpus)
from tokenflow.eval.shapes_detector import background_mask, detect_shapes

NUM_SAMPLES, SHARD_SIZE, SEED = 50, 8, 7
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
PHRASE = re.compile(rf"(a|an|two|three|four) ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)})(s?)")
RELATION = re.compile(r" (left of|right of|above|below) ")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _samples(urls: list[str]) -> list[dict[str, bytes | str]]:
    """Samples of local shards through webdataset, in shard order."""
    return list(wds.WebDataset(urls, shardshuffle=False))


def _relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Independent restatement of the dominant-axis rule: where ``a`` lies relative to ``b``."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _groups(objects: list[dict]) -> dict[tuple[str, str], tuple[int, tuple[float, float]]]:
    """(colour, shape) -> (count, mean centre), in order of first appearance."""
    members: dict[tuple[str, str], list[dict]] = {}
    for o in objects:
        members.setdefault((o["color"], o["shape"]), []).append(o)
    return {k: (len(v), (float(np.mean([o["center"][0] for o in v])), float(np.mean([o["center"][1] for o in v]))))
            for k, v in members.items()}


def _answer(question: str, objects: list[dict]) -> tuple[str, str]:
    """(type, true yes/no answer) of a generated question, computed from the objects list."""
    groups = _groups(objects)
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", question):
        return "existence", "yes" if (m[1], m[2]) in groups else "no"
    if m := re.fullmatch(r"(?:Is|Are) there exactly (\w+) (\w+) (circle|square|triangle)s? in the image\?", question):
        count = groups.get((m[2], m[3]), (0,))[0]
        return "count", "yes" if NUMBERS[m[1]] == count else "no"
    if m := re.fullmatch(r"(?:Is|Are) the (circle|square|triangle)s? (\w+)\?", question):
        colors = {o["color"] for o in objects if o["shape"] == m[1]}
        assert colors, question
        return "color", "yes" if colors == {m[2]} else "no"
    if m := re.fullmatch(r"(?:Is|Are) the (\w+) (circle|square|triangle)s? (left of|right of|above|below) "
                         r"the (\w+) (circle|square|triangle)s?\?", question):
        a, b = groups[(m[1], m[2])][1], groups[(m[4], m[5])][1]
        return "position", "yes" if _relation(a, b) == m[3] else "no"
    raise AssertionError(f"unrecognised question {question!r}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("shapes") / "a"
    return root, write_shapes_corpus(str(root), NUM_SAMPLES, SHARD_SIZE, SEED, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def records() -> list[tuple[Image.Image, str, dict]]:
    """300 generated (image, caption, json record) triples, through the public API."""
    rng = np.random.default_rng(123)
    out = []
    for _ in range(300):
        scene = generate_scene(rng)
        record = json.loads(json.dumps(annotate(scene, rng), sort_keys=True))
        out.append((render_scene(scene), caption(scene), record))
    return out


def test_same_seed_gives_byte_identical_shards(corpus, tmp_path):
    root, urls = corpus
    again = write_shapes_corpus(str(tmp_path / "b"), NUM_SAMPLES, SHARD_SIZE, SEED, heldout_fraction=0.2)
    first, second = _files(root), _files(tmp_path / "b")
    assert first == second
    assert sorted(first) == sorted(str(Path(u).relative_to(root)) for u in urls["train"] + urls["heldout"])
    assert [Path(u).name for u in again["train"]] == [Path(u).name for u in urls["train"]]


def test_different_seed_gives_different_shards(corpus, tmp_path):
    root, _ = corpus
    write_shapes_corpus(str(tmp_path / "c"), NUM_SAMPLES, SHARD_SIZE, SEED + 1, heldout_fraction=0.2)
    first, other = _files(root), _files(tmp_path / "c")
    shared = set(first) & set(other)
    assert shared and all(first[name] != other[name] for name in shared)


def test_counts_and_shard_sizes(corpus):
    _, urls = corpus
    assert urls["train"] and urls["heldout"]
    keys: dict[str, list[str]] = {}
    for split, shard_urls in urls.items():
        assert [Path(u).name for u in shard_urls] == [f"shapes-{i:06d}.tar" for i in range(len(shard_urls))]
        assert all(f"/{split}/" in u for u in shard_urls)
        sizes = []
        for url in shard_urls:
            with tarfile.open(url) as tar:
                names = tar.getnames()
            sizes.append(len(names) // 3)
            keys.setdefault(split, []).extend(n.rsplit(".", 1)[0] for n in names[::3])
        assert all(s == SHARD_SIZE for s in sizes[:-1]) and 1 <= sizes[-1] <= SHARD_SIZE
    assert len(keys["train"]) + len(keys["heldout"]) == NUM_SAMPLES
    assert sorted(keys["train"] + keys["heldout"]) == [f"shapes-{i:08d}" for i in range(NUM_SAMPLES)]


def test_split_is_per_sample_and_stable(corpus, tmp_path):
    _, urls = corpus
    bigger = write_shapes_corpus(str(tmp_path / "d"), 2 * NUM_SAMPLES, SHARD_SIZE, SEED, heldout_fraction=0.2)
    small = {s["__key__"] for s in _samples(urls["heldout"])}
    large = {s["__key__"] for s in _samples(bigger["heldout"])}
    assert small == {k for k in large if int(k.split("-")[1]) < NUM_SAMPLES}


def test_tar_members_are_fixed_and_ordered(corpus):
    _, urls = corpus
    with tarfile.open(urls["train"][0]) as tar:
        members = tar.getmembers()
    assert [m.name.rsplit(".", 1)[1] for m in members] == ["png", "txt", "json"] * SHARD_SIZE
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644) and m.isfile()


def test_webdataset_reads_samples_with_exact_pixels(corpus):
    _, urls = corpus
    samples = _samples(urls["train"] + urls["heldout"])
    assert len(samples) == NUM_SAMPLES
    allowed = {BACKGROUND, *PALETTE.values()}
    for s in samples:
        assert re.fullmatch(r"shapes-\d{8}", s["__key__"]) and {"png", "txt", "json"} <= set(s)
        raw = s["json"].decode("utf-8")
        record = json.loads(raw)
        assert raw == json.dumps(record, sort_keys=True)
        assert set(record) == {"objects", "questions", "conversations"}
        assert 1 <= len(record["objects"]) <= 4 and s["txt"].decode("utf-8")
        pixels = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        assert pixels.shape == (64, 64, 3)
        assert {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)} <= allowed
        for o in record["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            ys, xs = np.nonzero((pixels[y0:y1, x0:x1] == PALETTE[o["color"]]).all(-1))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0)
            assert x1 - x0 >= 12
            assert np.allclose([x0 + xs.mean() + 0.5, y0 + ys.mean() + 0.5], o["center"], atol=1e-3)


def test_captions_state_counts_colours_and_relations(records):
    seen_relation = False
    for _, text, record in records:
        groups = _groups(record["objects"])
        parts = RELATION.split(text)
        if len(groups) == 2:
            assert len(parts) == 3, text
            first, relation, second = parts
            phrases = [first, second]
            (_, ca), (_, cb) = groups.values()
            assert relation == _relation(ca, cb), text
            seen_relation = True
        else:
            assert len(parts) == 1, text
            phrases = text.split(" and ")
        parsed = []
        for phrase in phrases:
            m = PHRASE.fullmatch(phrase)
            assert m, (phrase, text)
            count = NUMBERS[m[1]]
            assert (m[4] == "s") == (count > 1) and (m[1] == "an") == (count == 1 and m[2][0] in "aeiou")
            parsed.append(((m[2], m[3]), count))
        assert parsed == [(k, n) for k, (n, _) in groups.items()], text
    assert seen_relation


def test_questions_are_one_yes_one_no_and_true(records):
    types = Counter()
    for _, _, record in records:
        questions = record["questions"]
        assert sorted(q["answer"] for q in questions) == ["no", "yes"]
        assert questions[0]["type"] == questions[1]["type"]
        for q in questions:
            kind, truth = _answer(q["question"], record["objects"])
            assert (kind, truth) == (q["type"], q["answer"]), q
            types[kind] += 1
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 2
        assert turns[0]["value"] == f"<image>\n{questions[0]['question']} Please answer yes or no."
        assert turns[2]["value"] == f"{questions[1]['question']} Please answer yes or no."
        assert [turns[1]["value"], turns[3]["value"]] == [q["answer"].capitalize() for q in questions]
    assert set(types) == {"existence", "count", "color", "position"}


@pytest.mark.parametrize("blur, required", [(0.0, 0.99), (0.6, 0.90)])
def test_detector_recovers_ground_truth(records, blur, required):
    found = total = extra = 0
    for image, _, record in records:
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        detections = detect_shapes(image)
        assert all(0.0 <= d.score <= 1.0 for d in detections)
        extra += max(0, len(detections) - len(record["objects"]))
        for o in record["objects"]:
            total += 1
            found += any(d.shape == o["shape"] and d.color == o["color"]
                         and np.hypot(d.center[0] - o["center"][0], d.center[1] - o["center"][1]) <= 2
                         for d in detections)
    assert found / total >= required, (found, total)
    assert extra <= 0.01 * total


def test_detector_accepts_arrays_and_is_exact_on_clean_images(records):
    image, _, record = records[0]
    arr = np.asarray(image)
    for source in (image, arr, arr.astype(np.float32) / 255.0):
        detections = detect_shapes(source)
        assert sorted((d.shape, d.color, d.bbox) for d in detections) == \
            sorted((o["shape"], o["color"], tuple(o["bbox"])) for o in record["objects"])
        assert all(d.score == 1.0 for d in detections)
    assert detect_shapes(np.full((64, 64, 3), 255, np.uint8)) == []


def test_background_is_white_or_a_pale_tint():
    red, blue = np.array(PALETTE["red"], float), np.array(PALETTE["blue"], float)
    white = np.array(BACKGROUND, float)
    pixels = np.array([[white, white + 0.3 * (red - white), white + 0.7 * (red - white), red,
                        (red + blue) / 2, (0.0, 80.0, 115.0)]], np.uint8)
    assert background_mask(pixels).tolist() == [[True, True, False, False, False, False]]


def test_a_blob_pressed_against_other_colours_is_not_an_object():
    image = np.full((64, 64, 3), 255, np.uint8)
    image[20:36, 20:36] = PALETTE["red"]
    (alone,) = detect_shapes(image)
    assert (alone.shape, alone.color, alone.isolation) == ("square", "red", 1.0)
    image[16:20, 16:40] = PALETTE["blue"]  # a bar above the square and an L down its left side
    image[16:40, 16:20] = PALETTE["blue"]
    assert detect_shapes(image) == []  # the L touches the square too
    assert sorted(d.color for d in detect_shapes(image, min_isolation=0.0)) == ["blue", "red"]


def test_clutter_gives_few_detections():
    """Blurred fields of random palette cells: nearly every blob touches another colour."""
    rng = np.random.default_rng(0)
    cells = np.array([BACKGROUND] * 3 + list(PALETTE.values()), np.uint8)
    gated = ungated = 0
    for _ in range(20):
        field = Image.fromarray(cells[rng.integers(0, len(cells), (8, 8))]).resize((64, 64), Image.NEAREST)
        field = field.filter(ImageFilter.GaussianBlur(1.0))
        gated += len(detect_shapes(field))
        ungated += len(detect_shapes(field, min_isolation=0.0))
    assert ungated > 200 and gated < 0.1 * ungated, (gated, ungated)


def test_memory_url_matches_local_bytes(corpus):
    root, local = corpus
    fs = fsspec.filesystem("memory")
    try:
        urls = write_shapes_corpus("memory://shapes-test", NUM_SAMPLES, SHARD_SIZE, SEED, heldout_fraction=0.2)
        assert all(u.startswith("memory://shapes-test/") for u in urls["train"] + urls["heldout"])
        assert not fs.glob("/shapes-test/*/*.tmp")
        for split in ("train", "heldout"):
            assert len(urls[split]) == len(local[split])
            for url, path in zip(urls[split], local[split]):
                with fsspec.open(url, "rb") as f:
                    assert f.read() == Path(path).read_bytes()
    finally:
        if fs.exists("/shapes-test"):
            fs.rm("/shapes-test", recursive=True)


@pytest.mark.parametrize("kwargs", [
    {"num_samples": 0}, {"shard_size": 0}, {"seed": -1}, {"heldout_fraction": 1.0},
    {"heldout_fraction": -0.1}, {"image_size": 16},
])
def test_bad_arguments_raise(tmp_path, kwargs):
    args = {"out_url": str(tmp_path), "num_samples": 4, "shard_size": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        write_shapes_corpus(**args)
    assert not any(tmp_path.iterdir())
