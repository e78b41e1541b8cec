"""The `shapes` POPE set: object-existence questions about held-out shapes images, with the
negatives of each split chosen as POPE chooses them, written in POPE's layout.

An object class is a (colour, shape) pair, "red circle": 6 colours x 3 shapes = 18 classes.
The three shapes alone would be too few: a scene can hold all three, leaving no absent shape to
ask about, and with at most two absent ones the splits could not differ. A scene holds at most
4 classes, so at least 14 are absent and negatives never run out.

As in POPE, an image gets :data:`PAIRS_PER_IMAGE` (3) yes/no pairs, so only held-out images with
at least 3 classes are used (about a fifth of the shapes scenes; the others are passed over).
The first 3 classes in drawing order are the positives ("Is there a red circle in the image?"
-> yes); each positive is followed by one negative (-> no), a class absent from the image and
not yet asked about it:

* random: drawn uniformly among those classes;
* popular: the most frequent class over the set's images (images containing it);
* adversarial: the class most often drawn together with this positive over the set's images;
  drawn at random when no such class is left (as POPE falls back).

Ties go to the earlier class in :data:`CLASSES`; random draws come from a generator seeded by
``(seed, image index, split index)``, so the same samples and seed give the same files. The
shapes corpus draws classes independently, so frequencies and co-occurrences are nearly flat
here: popular and adversarial negatives are harder than random ones only by chance of the
sample, unlike on COCO.

Layout (read by :func:`tokenflow.eval.pope.load_pope` with ``files=SHAPES_FILES`` and the image
root ``<out>/images``)::

    <out>/images/<name>.png
    <out>/shapes_pope_{random,popular,adversarial}.json    JSON lines, POPE's keys

``<name>`` is the sample key made safe as a file name (:func:`tokenflow.storage.safe_name`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig
from tokenflow.data.corpus import RawSample
from tokenflow.data.sample_json import SampleJSONError, parse_sample_object
from tokenflow.data.shapes import PALETTE, SHAPES
from tokenflow.eval.pope import SPLITS
from tokenflow.eval.shapes_mme import png_bytes
from tokenflow.seeding import seed_for

log = logging.getLogger(__name__)

SHAPES_FILES = "shapes_pope_{split}.json"
IMAGES_DIR = "images"
PAIRS_PER_IMAGE = 3
CLASSES: tuple[str, ...] = tuple(f"{color} {shape}" for color in PALETTE for shape in SHAPES)
_RANK = {name: i for i, name in enumerate(CLASSES)}


def question_text(name: str) -> str:
    """POPE's question about one class, with its article: "Is there an orange square in the image?"."""
    article = "an" if name[0] in "aeiou" else "a"
    return f"Is there {article} {name} in the image?"


def scene_classes(raw: str | bytes, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> tuple[str, ...]:
    """The distinct classes of a shapes sample's JSON record, in drawing order; raises
    ``SampleJSONError`` or ``ValueError`` on a record that is not a shapes scene."""
    classes: dict[str, None] = {}
    for obj in parse_sample_object(raw, {"objects": list}, limits)["objects"]:
        if not isinstance(obj, dict) or obj.get("shape") not in SHAPES or obj.get("color") not in PALETTE:
            raise ValueError(f"not a shapes object: {obj!r:.80}")
        classes[f"{obj['color']} {obj['shape']}"] = None
    return tuple(classes)


def _negative(split: str, positive: str, excluded: set[str], popular: Sequence[str],
              together: dict[str, Counter], rng: np.random.Generator) -> str:
    """One class not in ``excluded``, chosen as ``split`` chooses (module docstring)."""
    if split == "popular":
        return next(c for c in popular if c not in excluded)
    if split == "adversarial":
        ranked = sorted((c for c in together[positive] if c not in excluded),
                        key=lambda c: (-together[positive][c], _RANK[c]))
        if ranked:
            return ranked[0]
    candidates = [c for c in CLASSES if c not in excluded]
    return candidates[int(rng.integers(len(candidates)))]


def build_splits(images: Sequence[tuple[str, Sequence[str]]], seed: int) -> dict[str, list[dict[str, Any]]]:
    """Per split, the question records (POPE's keys, ids from 1) for ``images``: (image name,
    its distinct classes in drawing order, at least :data:`PAIRS_PER_IMAGE`)."""
    for name, present in images:
        if len(present) < PAIRS_PER_IMAGE or len(set(present)) != len(present) or set(present) - set(CLASSES):
            raise ValueError(f"{name}: needs {PAIRS_PER_IMAGE} distinct known classes, got {list(present)}")
    frequency = Counter(c for _, present in images for c in present)
    together: dict[str, Counter] = defaultdict(Counter)
    for _, present in images:
        for a in present:
            together[a].update(b for b in present if b != a)
    popular = sorted(CLASSES, key=lambda c: (-frequency[c], _RANK[c]))
    out: dict[str, list[dict[str, Any]]] = {}
    for split_index, split in enumerate(SPLITS):
        records: list[dict[str, Any]] = []
        for image_index, (name, present) in enumerate(images):
            rng = np.random.default_rng(seed_for(seed, image_index, split_index))
            asked = set(present)
            for positive in present[:PAIRS_PER_IMAGE]:
                negative = _negative(split, positive, asked, popular, together, rng)
                asked.add(negative)
                for asked_class, label in ((positive, "yes"), (negative, "no")):
                    records.append({"question_id": len(records) + 1, "image": name,
                                    "text": question_text(asked_class), "label": label})
        out[split] = records
    return out


def write_shapes_pope(out_url: str, samples: Iterable[RawSample], num_images: int, seed: int,
                      limits: SampleLimitsConfig = DEFAULT_LIMITS) -> int:
    """Write the set from the first ``num_images`` held-out samples with at least
    :data:`PAIRS_PER_IMAGE` classes (``samples`` in manifest order); returns the images written."""
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    images: list[tuple[str, tuple[str, ...]]] = []
    names: set[str] = set()
    for sample in samples:
        if len(images) == num_images:
            break
        if sample.image is None or not sample.json:
            continue
        try:
            present = scene_classes(sample.json, limits)
        except (SampleJSONError, ValueError) as exc:
            log.warning("held-out sample %r is not a usable shapes scene (%s)", sample.key, exc)
            continue
        name = f"{storage.safe_name(sample.key)}.png"
        if len(present) < PAIRS_PER_IMAGE or name in names:
            continue
        storage.write_bytes_atomic(storage.join(out_url, IMAGES_DIR, name), png_bytes(sample.image))
        names.add(name)
        images.append((name, present))
    if not images:
        raise ValueError(f"no held-out shapes sample has {PAIRS_PER_IMAGE} object classes for POPE")
    if len(images) < num_images:
        log.warning("shapes POPE: %d of the %d images asked for (held-out samples with %d classes)",
                    len(images), num_images, PAIRS_PER_IMAGE)
    for split, records in build_splits(images, seed).items():
        lines = "".join(json.dumps(r) + "\n" for r in records)
        storage.write_bytes_atomic(storage.join(out_url, SHAPES_FILES.format(split=split)), lines.encode("utf-8"))
    return len(images)
