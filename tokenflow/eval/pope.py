"""POPE: object-existence yes/no questions (loader, the official reading of replies, metrics).

Release layout: one file per negative-sampling split (random, popular, adversarial) in one
directory, named by a pattern: ``coco_pope_{split}.json`` for the COCO release,
``aokvqa_pope_seem_{split}.json`` / ``gqa_pope_seem_{split}.json`` for the SEEM-built ones. A
file holds JSON lines (the COCO release) or one JSON array (the SEEM releases) of objects

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a snowboard in the image?", "label": "yes"}

``image`` is relative to an image root (COCO val2014 for the COCO files). A file is read whole
(at most :data:`MAX_FILE_BYTES`), each object through the bounded sample-JSON parser; unknown or
missing keys, labels other than yes/no, duplicate question ids and image names that are not
plain relative paths are errors naming the file and line (or array entry).

Reading a reply (POPE's ``evaluate.py``): keep the text before the first ".", drop commas,
split on single spaces; the answer is "no" when a word is exactly ``No``, ``no`` or ``not``,
else "yes". Case and punctuation count as written ("NO", "Not", "Nope", "no!" read "yes"), and
a reply with neither answer, the empty one included, reads "yes": it is counted as unparsed
(:func:`is_explicit`) but scored as the official tool scores it. A question without a reply
(``None``: its image could not be read) is unparsed and scored wrong, the answer opposite its
label (a false negative or a false positive), never as the empty reply's "yes".

Metrics per split, "yes" the positive class: accuracy, precision = TP / (TP + FP), recall =
TP / (TP + FN), F1 = 2PR / (P + R), yes-ratio = share of replies read "yes". A zero denominator
(no reply read "yes", or no "yes" label) gives 0 where the official script divides by zero.
The unsuffixed names are the means over the splits present.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig
from tokenflow.data.sample_json import SampleJSONError, parse_sample_json

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
DEFAULT_FILES = "coco_pope_{split}.json"
MAX_FILE_BYTES = 64 * 2**20
METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_KEYS: dict[str, type] = {"question_id": int, "image": str, "text": str, "label": str}
_NEGATIVE_WORDS = frozenset({"No", "no", "not"})
_PUNCTUATION = "!?;:\"'()[]"
_SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class POPEQuestion:
    """One question of one split; ``image`` is the image's URL, ``label`` "yes" or "no"."""

    split: str
    question_id: int
    image: str
    question: str
    label: str


def _objects(url: str, limits: SampleLimitsConfig) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) of every question object of one file: ``line N`` or ``entry N``."""
    text = storage.read_text_bounded(url, MAX_FILE_BYTES, "POPE file")
    if text.lstrip().startswith("["):
        whole = limits.model_copy(update={"max_json_bytes": MAX_FILE_BYTES})
        try:
            entries = parse_sample_json(text, whole)
        except SampleJSONError as exc:
            raise ValueError(f"{url}: {exc.reason}: {exc}") from None
        yield from ((f"entry {i}", entry) for i, entry in enumerate(entries))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {number}", parse_sample_json(line, limits)
            except SampleJSONError as exc:
                raise ValueError(f"{url}:line {number}: {exc.reason}: {exc}") from None


def _question(value: Any, split: str, image_root_url: str) -> POPEQuestion:
    """One validated question object; raises ``ValueError`` saying what is wrong."""
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    if set(value) != set(_KEYS):
        raise ValueError(f"keys {sorted(value)}, expected {sorted(_KEYS)}")
    for key, kind in _KEYS.items():
        if not isinstance(value[key], kind) or isinstance(value[key], bool):
            raise ValueError(f"{key!r} must be {kind.__name__}")
    label = value["label"].strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"label {value['label']!r} is neither yes nor no")
    image = value["image"]
    if not all(_SAFE_SEGMENT.match(part) for part in image.split("/")):
        raise ValueError(f"image {image!r} is not a relative path of plain names")
    return POPEQuestion(split, value["question_id"], storage.join(image_root_url, image), value["text"].strip(),
                        label)


def load_pope(root_url: str, image_root_url: str, files: str = DEFAULT_FILES,
              limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[POPEQuestion]:
    """Every question of the three split files under ``root_url`` (``files`` with ``{split}``),
    images under ``image_root_url`` (any fsspec URLs); splits in :data:`SPLITS` order, questions
    in file order."""
    fs, path = storage.filesystem(image_root_url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"POPE image root not found: {image_root_url}")
    questions: list[POPEQuestion] = []
    for split in SPLITS:
        url = storage.join(root_url, files.format(split=split))
        ids: set[int] = set()
        for where, value in _objects(url, limits):
            try:
                question = _question(value, split, image_root_url)
            except ValueError as exc:
                raise ValueError(f"{url}:{where}: {exc}") from None
            if question.question_id in ids:
                raise ValueError(f"{url}:{where}: question_id {question.question_id} appears twice")
            ids.add(question.question_id)
            questions.append(question)
        if not ids:
            raise ValueError(f"{url}: no questions")
    return questions


def _first_sentence_words(reply: str) -> list[str]:
    return reply.split(".", 1)[0].replace(",", "").split(" ")


def read_reply(reply: str) -> str:
    """A free-form reply as "yes" or "no", as POPE's evaluate.py reads it (module docstring)."""
    return "no" if _NEGATIVE_WORDS.intersection(_first_sentence_words(reply)) else "yes"


def answer_to(question: POPEQuestion, reply: str | None) -> str:
    """The answer ``reply`` gives to ``question``: :func:`read_reply`'s, or the wrong one when
    there is no reply (``None``: the image could not be read)."""
    if reply is None:
        return "no" if question.label == "yes" else "yes"
    return read_reply(reply)


def is_explicit(reply: str | None) -> bool:
    """Whether the reply's first sentence answers: a negative word as :func:`read_reply` finds
    it, or "yes" in any case once surrounding punctuation is stripped. The others read "yes"
    only by default; no reply (``None``) is not explicit."""
    if reply is None:
        return False
    words = _first_sentence_words(reply)
    return bool(_NEGATIVE_WORDS.intersection(words)) or any(w.strip(_PUNCTUATION).lower() == "yes" for w in words)


@dataclass(frozen=True)
class SplitScore:
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    num_questions: int


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def score_split(labels: Sequence[str], answers: Sequence[str]) -> SplitScore:
    """The metrics of one split from labels and answers read as "yes"/"no" (same order)."""
    if len(labels) != len(answers) or not labels:
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    pairs = list(zip(labels, answers))
    tp = sum(label == "yes" and answer == "yes" for label, answer in pairs)
    fp = sum(label == "no" and answer == "yes" for label, answer in pairs)
    fn = sum(label == "yes" and answer == "no" for label, answer in pairs)
    tn = len(pairs) - tp - fp - fn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return SplitScore(accuracy=(tp + tn) / len(pairs), precision=precision, recall=recall,
                      f1=_ratio(2 * precision * recall, precision + recall), yes_ratio=(tp + fp) / len(pairs),
                      num_questions=len(pairs))


@dataclass(frozen=True)
class POPEScores:
    """Per-split scores and the share of replies that gave no answer (read "yes")."""

    splits: dict[str, SplitScore]
    unparsed_rate: float

    def metrics(self) -> dict[str, float]:
        """``<split>/<metric>``, the means over the splits as ``<metric>``, ``num_questions`` and
        ``unparsed_rate``."""
        out: dict[str, float] = {}
        for name, score in self.splits.items():
            out.update({f"{name}/{m}": getattr(score, m) for m in METRICS})
        out.update({m: sum(getattr(s, m) for s in self.splits.values()) / len(self.splits) for m in METRICS})
        out["num_questions"] = float(sum(s.num_questions for s in self.splits.values()))
        out["unparsed_rate"] = self.unparsed_rate
        return out


def score_pope(questions: Sequence[POPEQuestion], replies: Sequence[str | None]) -> POPEScores:
    """Score raw model replies, one per question, in the same order (``None``: no reply)."""
    if len(questions) != len(replies):
        raise ValueError(f"{len(replies)} replies for {len(questions)} questions")
    if not questions:
        raise ValueError("no POPE questions to score")
    per_split: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for q, reply in zip(questions, replies):
        if q.split not in SPLITS:
            raise ValueError(f"unknown POPE split {q.split!r}")
        per_split[q.split][0].append(q.label)
        per_split[q.split][1].append(answer_to(q, reply))
    return POPEScores({name: score_split(*per_split[name]) for name in SPLITS if name in per_split},
                      sum(not is_explicit(r) for r in replies) / len(replies))
