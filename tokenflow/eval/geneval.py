"""GenEval: object-focused scoring of generated images against structured prompt metadata.

Metadata is the official ``evaluation_metadata.jsonl`` format, one prompt per line::

    {"tag": "position", "prompt": "a photo of a bird below a skateboard",
     "include": [{"class": "skateboard", "count": 1},
                 {"class": "bird", "count": 1, "position": ["below", 0]}]}
    {"tag": "counting", "prompt": "a photo of three buses",
     "include": [{"class": "bus", "count": 3}], "exclude": [{"class": "bus", "count": 4}]}

Scoring one image follows the official rules (djghosh13/geneval, ``evaluate_images.py``):

1. Detections of each class with score strictly above the threshold (0.3; 0.9 for the
   ``counting`` tag) are kept, most confident first, at most 16 per class; then greedy per-class
   NMS drops boxes whose IoU with a kept one is >= ``max_overlap`` (1.0 officially: no NMS).
2. Every ``include`` clause must hold (AND), in order: at least ``count`` objects of the class;
   with ``color``, at least ``count`` of the ``count`` most confident ones classified as that
   colour (over the colour list, 10 colours officially); with ``position: [relation, i]``, each
   of those objects must stand in ``relation`` to every object that satisfied clause ``i``
   (a failed clause ``i`` fails this one too).
3. Any ``exclude`` clause fails the image (OR) when the kept objects of its class number at
   least its ``count``.

Relative position (:func:`relative_position`) compares box centres after shrinking the offset on
each axis by ``position_margin`` (0.1) times the sum of the two boxes' sizes on that axis;
``left of``/``right of``/``above``/``below`` hold when the shrunk offset, divided by the length
of the unshrunk offset, is beyond 0.5 on that axis (y grows downward).

Aggregation: accuracy per tag (mean of the per-image correct flags), overall score = mean of the
tag accuracies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from tokenflow import storage

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                           "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Include:
    """An object group the image must contain; ``position`` is ``(relation, clause index)``."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class Exclude:
    """The image fails when it holds ``count`` or more objects of ``cls``."""

    cls: str
    count: int


@dataclass(frozen=True)
class GenEvalPrompt:
    """One metadata line."""

    tag: str
    prompt: str
    include: tuple[Include, ...]
    exclude: tuple[Exclude, ...] = ()

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> "GenEvalPrompt":
        """Parse and check one metadata record (the official keys only)."""
        unknown = set(record) - {"tag", "prompt", "include", "exclude"}
        if unknown:
            raise ValueError(f"unknown metadata keys {sorted(unknown)}")
        includes = []
        for i, clause in enumerate(record["include"]):
            position = clause.get("position")
            if position is not None:
                relation, target = position
                if relation not in RELATIONS or not 0 <= int(target) < i:
                    raise ValueError(f"include[{i}]: bad position {position!r}")
                position = (str(relation), int(target))
            includes.append(Include(str(clause["class"]), int(clause["count"]), clause.get("color"), position))
        excludes = tuple(Exclude(str(c["class"]), int(c["count"])) for c in record.get("exclude", []))
        return cls(str(record["tag"]), str(record["prompt"]), tuple(includes), excludes)

    def to_json(self) -> dict[str, Any]:
        """The record as the official JSONL line holds it."""
        includes = []
        for clause in self.include:
            item: dict[str, Any] = {"class": clause.cls, "count": clause.count}
            if clause.color is not None:
                item["color"] = clause.color
            if clause.position is not None:
                item["position"] = list(clause.position)
            includes.append(item)
        out: dict[str, Any] = {"tag": self.tag, "include": includes}
        if self.exclude:
            out["exclude"] = [{"class": c.cls, "count": c.count} for c in self.exclude]
        out["prompt"] = self.prompt
        return out


def load_metadata(url: str) -> list[GenEvalPrompt]:
    """Prompts of a metadata JSONL file (any fsspec URL), in file order; blank lines skipped."""
    lines = storage.read_bytes(url).decode("utf-8").splitlines()
    prompts = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                prompts.append(GenEvalPrompt.from_json(json.loads(line)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{url}:{number}: not a GenEval metadata record: {exc}") from exc
    return prompts


def write_metadata(url: str, prompts: Iterable[GenEvalPrompt]) -> None:
    """Write prompts as metadata JSONL (atomically)."""
    text = "".join(json.dumps(p.to_json()) + "\n" for p in prompts)
    storage.write_bytes_atomic(url, text.encode("utf-8"))


def as_bbox(values: Iterable[float]) -> BBox:
    """Four numbers (a sequence or a tensor row) as a float ``(x0, y0, x1, y1)`` box."""
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, confidence, pixel box ``(x0, y0, x1, y1)``.

    ``color`` is set only by detectors that read colour exactly (the shapes backend).
    """

    label: str
    score: float
    bbox: BBox
    color: str | None = None


class ObjectDetector(Protocol):
    def detect(self, image: Image.Image) -> list[Detection]:
        """Every candidate detection of the image (thresholds are applied by the scorer)."""
        ...


class ColorClassifier(Protocol):
    def classify(self, image: Image.Image, detection: Detection, colors: Sequence[str]) -> str:
        """The one of ``colors`` the detected object has."""
        ...


@dataclass(frozen=True)
class GenEvalRules:
    """The official scoring settings (see the module docstring)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_margin: float = 0.1
    colors: tuple[str, ...] = COLORS


@dataclass(frozen=True)
class ImageResult:
    """The verdict on one image; ``reason`` lists every failed clause ('' when correct)."""

    tag: str
    prompt: str
    correct: bool
    reason: str
    detections: Mapping[str, tuple[Detection, ...]] = field(default_factory=dict)


def box_iou(a: BBox, b: BBox) -> float:
    """IoU with the official inclusive-pixel convention (a box spans ``x1 - x0 + 1`` pixels)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def keep_detections(detections: Iterable[Detection], tag: str,
                    rules: GenEvalRules = GenEvalRules()) -> dict[str, list[Detection]]:
    """Class -> kept detections, most confident first (threshold, per-class cap, NMS)."""
    threshold = rules.counting_threshold if tag == "counting" else rules.threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > threshold:
            by_class.setdefault(det.label, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        queue = sorted(dets, key=lambda d: -d.score)[: rules.max_objects]
        chosen: list[Detection] = []
        while queue:
            best = queue.pop(0)
            chosen.append(best)
            if rules.max_overlap < 1:
                queue = [d for d in queue if box_iou(best.bbox, d.bbox) < rules.max_overlap]
        kept[label] = chosen
    return kept


def relative_position(a: BBox, b: BBox, margin: float = 0.1) -> set[str]:
    """The relations box ``a`` stands in to box ``b`` (possibly none, possibly two)."""
    boxes = np.array([a, b], dtype=np.float64).reshape(2, 2, 2)  # box, corner, (x, y)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    shrunk = np.maximum(np.abs(offset) - margin * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate_detections(image: Image.Image, objects: Mapping[str, Sequence[Detection]],
                        prompt: GenEvalPrompt, color_classifier: ColorClassifier,
                        rules: GenEvalRules = GenEvalRules()) -> tuple[bool, str]:
    """(correct, reason) for kept detections (:func:`keep_detections`) against one prompt."""
    reasons: list[str] = []
    matched: list[Sequence[Detection] | None] = []
    for clause in prompt.include:
        found = list(objects.get(clause.cls, ()))[: clause.count]
        ok = len(found) >= clause.count
        if not ok:
            reasons.append(f"expected {clause.count} {clause.cls}, found {len(found)}")
        if ok and clause.color is not None:
            colors = [color_classifier.classify(image, det, rules.colors) for det in found]
            if colors.count(clause.color) < clause.count:
                ok = False
                reasons.append(f"expected {clause.count} {clause.color} {clause.cls}, "
                               f"found colours {', '.join(colors)}")
        if ok and clause.position is not None:
            relation, target = clause.position
            targets = matched[target]
            if targets is None:
                ok = False
                reasons.append(f"no target for {clause.cls} to be {relation}")
            else:
                for det in found:
                    bad = next((t for t in targets if relation not in
                                relative_position(det.bbox, t.bbox, rules.position_margin)), None)
                    if bad is not None:
                        ok = False
                        actual = relative_position(det.bbox, bad.bbox, rules.position_margin)
                        reasons.append(f"expected {clause.cls} {relation} {prompt.include[target].cls}, "
                                       f"found {' and '.join(sorted(actual)) or 'no clear relation'}")
                        break
        matched.append(found if ok else None)
    for clause in prompt.exclude:
        n = len(objects.get(clause.cls, ()))
        if n >= clause.count:
            reasons.append(f"expected fewer than {clause.count} {clause.cls}, found {n}")
    return not reasons, "; ".join(reasons)


def score_image(image: Image.Image, prompt: GenEvalPrompt, detector: ObjectDetector,
                color_classifier: ColorClassifier, rules: GenEvalRules = GenEvalRules()) -> ImageResult:
    """Detect, filter and judge one generated image."""
    image = image.convert("RGB")
    kept = keep_detections(detector.detect(image), prompt.tag, rules)
    correct, reason = evaluate_detections(image, kept, prompt, color_classifier, rules)
    return ImageResult(prompt.tag, prompt.prompt, correct, reason,
                       {label: tuple(dets) for label, dets in kept.items()})


@dataclass(frozen=True)
class GenEvalSummary:
    """Per-tag accuracy (tags in order of first appearance), their mean, and the image count."""

    per_tag: dict[str, float]
    overall: float
    num_images: int

    def metrics(self) -> dict[str, float]:
        """Flat name -> value mapping for tracking."""
        return {"overall": self.overall, "num_images": float(self.num_images),
                **{f"{tag}/accuracy": score for tag, score in self.per_tag.items()}}


def summarize(results: Iterable[ImageResult]) -> GenEvalSummary:
    """Mean correctness per tag; overall = unweighted mean over the tags present."""
    by_tag: dict[str, list[bool]] = {}
    for result in results:
        by_tag.setdefault(result.tag, []).append(result.correct)
    if not by_tag:
        raise ValueError("no GenEval results to summarize")
    per_tag = {tag: float(np.mean(flags)) for tag, flags in by_tag.items()}
    return GenEvalSummary(per_tag, float(np.mean(list(per_tag.values()))),
                          sum(len(flags) for flags in by_tag.values()))
