"""The procedural `shapes` corpus: flat-coloured geometric objects on white, with annotations.

A scene holds 1-4 non-overlapping objects (circle, square, triangle), each a ``size x size``
box filled without antialiasing in one colour of :data:`PALETTE`, so every pixel of a rendered
image is exactly the background or one palette colour. Everything is driven by a
``numpy.random.Generator``, so the same seed always gives the same scenes and the same bytes.

Coordinates are pixels: ``bbox`` is ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive (the tight
box of the drawn pixels), ``center`` is the mean of the drawn pixels' centres (pixel ``(x, y)``
has its centre at ``(x + 0.5, y + 0.5)``).

Caption grammar (groups are the distinct (colour, shape) pairs in order of first appearance;
a group reads "a red circle" / "an orange square" / "two red circles", number words to four):

    caption  := group RELATION group          when there are exactly two groups
              | group (" and " group)*         otherwise
    RELATION := "left of" | "right of" | "above" | "below"

The relation is the first group's centroid relative to the second's along the dominant axis
(:func:`spatial_relation`). Each image also gets an MME-style pair of yes/no questions of one
type (existence, count, color or position): one answered "yes", one "no".
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

import fsspec
import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "red": (230, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 230),
    "yellow": (255, 225, 0),
    "purple": (140, 0, 190),
    "orange": (255, 128, 0),
})
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBER_WORDS: Mapping[int, str] = MappingProxyType({1: "one", 2: "two", 3: "three", 4: "four"})
OPPOSITE_RELATION: Mapping[str, str] = MappingProxyType(
    {"left of": "right of", "right of": "left of", "above": "below", "below": "above"})
QUESTION_TYPES: tuple[str, ...] = ("existence", "count", "color", "position")

MAX_OBJECTS = 4
MIN_OBJECT_SIZE = 12  # px: smallest side that still classifies reliably
MIN_IMAGE_SIZE = 48
_GAP = 3  # px of background kept between objects
_MARGIN = 2  # px of background kept at the image border
_PLACEMENT_TRIES = 100
_SHARD_PATTERN = "shapes-{:06d}.tar"
_KEY_PATTERN = "shapes-{:08d}"
_MEMBER_ORDER = ("png", "txt", "json")


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its shape, palette colour name, tight pixel box and pixel centroid."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        """The object as stored in a sample's ``.json`` member."""
        return {"shape": self.shape, "color": self.color, "bbox": list(self.bbox),
                "center": [round(self.center[0], 3), round(self.center[1], 3)]}


@dataclass(frozen=True)
class Group:
    """All objects of one (colour, shape) pair: how many, and the mean of their centres."""

    color: str
    shape: str
    count: int
    center: tuple[float, float]


@dataclass(frozen=True)
class Scene:
    """The objects of one image, in drawing order."""

    objects: tuple[SceneObject, ...]

    def groups(self) -> list[Group]:
        """Distinct (colour, shape) pairs in order of first appearance."""
        members: dict[tuple[str, str], list[SceneObject]] = {}
        for obj in self.objects:
            members.setdefault((obj.color, obj.shape), []).append(obj)
        return [Group(color, shape, len(objs),
                      (float(np.mean([o.center[0] for o in objs])), float(np.mean([o.center[1] for o in objs]))))
                for (color, shape), objs in members.items()]


def object_size_range(image_size: int) -> tuple[int, int]:
    """Smallest and largest object side (inclusive) for an image size: 12..22 px at 64 px."""
    low = max(MIN_OBJECT_SIZE, image_size * 3 // 16)
    return low, max(low, image_size * 11 // 32)


def shape_mask(shape: str, width: int, height: int | None = None) -> np.ndarray:
    """Boolean ``[height, width]`` mask of a shape filling its box, tight on all four sides.

    Circle: pixel centres inside the inscribed ellipse. Square: the whole box. Triangle: apex at
    the top centre, base along the bottom row (row ``i`` half-width ``(i + 1) * width / 2h``).
    """
    height = width if height is None else height
    if width < 1 or height < 1:
        raise ValueError(f"shape box must be at least 1x1, got {width}x{height}")
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    if shape == "circle":
        return ((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2 <= 1.0
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":
        rows = np.arange(1, height + 1, dtype=np.float64)[:, None]
        return np.abs(xs - width / 2) <= rows * width / (2 * height)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _check_image_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")


def _make_object(shape: str, color: str, x0: int, y0: int, size: int) -> SceneObject:
    mask = shape_mask(shape, size)
    ys, xs = np.nonzero(mask)
    center = (float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5))
    return SceneObject(shape, color, (x0, y0, x0 + size, y0 + size), center)


def _place_boxes(rng: np.random.Generator, n: int, image_size: int) -> list[tuple[int, int, int]]:
    """``n`` random ``(x0, y0, size)`` squares, ``_GAP`` apart and ``_MARGIN`` from the border."""
    low, high = object_size_range(image_size)
    while True:
        sizes = rng.integers(low, high + 1, size=n)
        boxes: list[tuple[int, int, int]] = []
        for size in map(int, sizes):
            for _ in range(_PLACEMENT_TRIES):
                x0, y0 = (int(v) for v in rng.integers(_MARGIN, image_size - _MARGIN - size + 1, size=2))
                if any(x0 < bx + bs + _GAP and bx < x0 + size + _GAP
                       and y0 < by + bs + _GAP and by < y0 + size + _GAP for bx, by, bs in boxes):
                    continue
                boxes.append((x0, y0, size))
                break
            else:
                break  # no room left: draw new sizes and start over
        if len(boxes) == n:
            return boxes


def generate_scene(rng: np.random.Generator, image_size: int = 64) -> Scene:
    """A random scene: 1-4 objects spread over 1..n distinct (colour, shape) groups."""
    _check_image_size(image_size)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    n_groups = int(rng.integers(1, n + 1))
    kinds = [(color, shape) for color in PALETTE for shape in SHAPES]
    picked = [kinds[int(i)] for i in rng.choice(len(kinds), size=n_groups, replace=False)]
    picked += [picked[int(rng.integers(n_groups))] for _ in range(n - n_groups)]
    picked = [picked[int(i)] for i in rng.permutation(n)]
    boxes = _place_boxes(rng, n, image_size)
    return Scene(tuple(_make_object(shape, color, x0, y0, size)
                       for (color, shape), (x0, y0, size) in zip(picked, boxes)))


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw a scene as an RGB image: white background, flat palette colours, no antialiasing."""
    canvas = np.empty((image_size, image_size, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        if x0 < 0 or y0 < 0 or x1 > image_size or y1 > image_size:
            raise ValueError(f"object box {obj.bbox} does not fit a {image_size}px image")
        canvas[y0:y1, x0:x1][shape_mask(obj.shape, x1 - x0, y1 - y0)] = PALETTE[obj.color]
    return Image.fromarray(canvas, mode="RGB")


def spatial_relation(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where point ``a`` lies relative to ``b`` along the dominant axis (ties go horizontal)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun(shape: str, count: int) -> str:
    return shape if count == 1 else f"{shape}s"


def _indefinite(color: str, shape: str, count: int) -> str:
    """"a red circle", "an orange square", "two red circles"."""
    quantity = _article(color) if count == 1 else NUMBER_WORDS[count]
    return f"{quantity} {color} {_noun(shape, count)}"


def _definite(color: str, shape: str, count: int) -> str:
    """"the red circle", "the red circles"."""
    return f"the {color} {_noun(shape, count)}"


def caption(scene: Scene) -> str:
    """Counts, colours and (for two groups) the relative position, e.g. "two red circles left of
    a blue square"; see the module docstring for the grammar."""
    groups = scene.groups()
    phrases = [_indefinite(g.color, g.shape, g.count) for g in groups]
    if len(groups) == 2:
        return f"{phrases[0]} {spatial_relation(groups[0].center, groups[1].center)} {phrases[1]}"
    return " and ".join(phrases)


def _count_question(color: str, shape: str, count: int) -> str:
    if count == 1:
        return f"Is there exactly one {color} {shape} in the image?"
    return f"Are there exactly {NUMBER_WORDS[count]} {color} {shape}s in the image?"


def _existence_pair(scene: Scene, groups: list[Group], rng: np.random.Generator) -> tuple[str, str]:
    present = groups[int(rng.integers(len(groups)))]
    taken = {(g.color, g.shape) for g in groups}
    absent = [(c, s) for c in PALETTE for s in SHAPES if (c, s) not in taken]
    color, shape = absent[int(rng.integers(len(absent)))]
    return (f"Is there {_article(present.color)} {present.color} {present.shape} in the image?",
            f"Is there {_article(color)} {color} {shape} in the image?")


def _count_pair(scene: Scene, groups: list[Group], rng: np.random.Generator) -> tuple[str, str]:
    g = groups[int(rng.integers(len(groups)))]
    wrong = [n for n in NUMBER_WORDS if n != g.count]
    return (_count_question(g.color, g.shape, g.count),
            _count_question(g.color, g.shape, wrong[int(rng.integers(len(wrong)))]))


def _single_color_shapes(scene: Scene) -> list[str]:
    """Shapes present in the scene in exactly one colour (so "Is the circle red?" is well posed)."""
    return [s for s in SHAPES if len({o.color for o in scene.objects if o.shape == s}) == 1]


def _color_pair(scene: Scene, groups: list[Group], rng: np.random.Generator) -> tuple[str, str]:
    candidates = _single_color_shapes(scene)
    shape = candidates[int(rng.integers(len(candidates)))]
    members = [o for o in scene.objects if o.shape == shape]
    color = members[0].color
    others = [c for c in PALETTE if c != color]
    verb = "Is" if len(members) == 1 else "Are"
    noun = _noun(shape, len(members))
    return (f"{verb} the {noun} {color}?", f"{verb} the {noun} {others[int(rng.integers(len(others)))]}?")


def _position_pair(scene: Scene, groups: list[Group], rng: np.random.Generator) -> tuple[str, str]:
    i, j = (int(k) for k in rng.choice(len(groups), size=2, replace=False))
    a, b = groups[i], groups[j]
    relation = spatial_relation(a.center, b.center)
    verb = "Is" if a.count == 1 else "Are"
    subject, other = _definite(a.color, a.shape, a.count), _definite(b.color, b.shape, b.count)
    return (f"{verb} {subject} {relation} {other}?",
            f"{verb} {subject} {OPPOSITE_RELATION[relation]} {other}?")


_PAIR_MAKERS: Mapping[str, Callable[[Scene, list[Group], np.random.Generator], tuple[str, str]]] = {
    "existence": _existence_pair, "count": _count_pair, "color": _color_pair, "position": _position_pair}


def make_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """An MME-style pair of yes/no questions of one random applicable type, in random order.

    Types: existence (a (colour, shape) present / absent), count (true / wrong count of a group),
    color (of a shape present in one colour only), position (two groups, true / opposite relation).
    """
    groups = scene.groups()
    applicable = {"existence": True, "count": True, "color": bool(_single_color_shapes(scene)),
                  "position": len(groups) >= 2}
    types = [t for t in QUESTION_TYPES if applicable[t]]
    kind = types[int(rng.integers(len(types)))]
    yes, no = _PAIR_MAKERS[kind](scene, groups, rng)
    pair = [{"question": yes, "answer": "yes", "type": kind}, {"question": no, "answer": "no", "type": kind}]
    return pair[::-1] if rng.random() < 0.5 else pair


def make_conversations(questions: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    """LLaVA-style turns, one human/gpt pair per question; ``<image>`` leads the first turn only."""
    turns: list[dict[str, str]] = []
    for i, q in enumerate(questions):
        prefix = "<image>\n" if i == 0 else ""
        turns.append({"from": "human", "value": f"{prefix}{q['question']} Please answer yes or no."})
        turns.append({"from": "gpt", "value": q["answer"].capitalize()})
    return turns


def annotate(scene: Scene, rng: np.random.Generator) -> dict[str, Any]:
    """The sample's ``.json`` record: objects, yes/no questions and conversations."""
    questions = make_questions(scene, rng)
    return {"objects": [o.to_json() for o in scene.objects], "questions": questions,
            "conversations": make_conversations(questions)}


def encode_png(image: Image.Image) -> bytes:
    """Lossless, deterministic PNG bytes (no metadata, fixed compression level)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _sample_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent (split, scene) generators for one sample index: each sample stands alone."""
    split_seq, scene_seq = np.random.SeedSequence([seed, index]).spawn(2)
    return np.random.default_rng(split_seq), np.random.default_rng(scene_seq)


def _make_sample(seed: int, index: int, image_size: int) -> dict[str, bytes]:
    _, rng = _sample_rngs(seed, index)
    scene = generate_scene(rng, image_size)
    return {"png": encode_png(render_scene(scene, image_size)),
            "txt": caption(scene).encode("utf-8"),
            "json": json.dumps(annotate(scene, rng), sort_keys=True).encode("utf-8")}


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _write_shard(fs: fsspec.AbstractFileSystem, path: str,
                 samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """Stream samples into ``<path>.tmp`` as a tar, then move it to ``path``."""
    tmp = f"{path}.tmp"
    try:
        with fs.open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for ext in _MEMBER_ORDER:
                    data = members[ext]
                    tar.addfile(_tar_info(f"{key}.{ext}", len(data)), io.BytesIO(data))
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise
    fs.mv(tmp, path)


def write_shapes_corpus(out_url: str, num_samples: int, shard_size: int, seed: int,
                        heldout_fraction: float = 0.1, image_size: int = 64) -> dict[str, list[str]]:
    """Write the corpus as webdataset shards under ``out_url`` (any fsspec URL).

    Layout: ``<out>/train/shapes-000000.tar``, ... and ``<out>/heldout/shapes-000000.tar``, ...;
    each sample is ``<key>.png``, ``<key>.txt`` (caption) and ``<key>.json`` with key
    ``shapes-<index:08d>``. Sample ``index`` is held out iff a draw from its own seeded generator
    falls below ``heldout_fraction``, so the split does not depend on ``num_samples``. The same
    arguments always produce byte-identical shards. Returns ``{"train": [...], "heldout": [...]}``
    shard URLs in order.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    _check_image_size(image_size)

    splits: dict[str, list[int]] = {"train": [], "heldout": []}
    for index in range(num_samples):
        split_rng, _ = _sample_rngs(seed, index)
        splits["heldout" if split_rng.random() < heldout_fraction else "train"].append(index)

    fs, root = fsspec.core.url_to_fs(out_url)
    base_url = out_url.rstrip("/")
    urls: dict[str, list[str]] = {"train": [], "heldout": []}
    with tqdm(total=num_samples, desc="shapes corpus", unit="img") as progress:
        for split, indices in splits.items():
            fs.makedirs(posixpath.join(root, split), exist_ok=True)
            for shard, start in enumerate(range(0, len(indices), shard_size)):
                name = _SHARD_PATTERN.format(shard)
                chunk = indices[start:start + shard_size]
                _write_shard(fs, posixpath.join(root, split, name),
                             ((_KEY_PATTERN.format(i), _make_sample(seed, i, image_size)) for i in chunk))
                progress.update(len(chunk))
                urls[split].append(f"{base_url}/{split}/{name}")
    log.info("shapes corpus at %s: %d train samples in %d shards, %d held out in %d shards",
             out_url, len(splits["train"]), len(urls["train"]), len(splits["heldout"]), len(urls["heldout"]))
    return urls
