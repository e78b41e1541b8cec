"""MME: yes/no perception and cognition benchmark (loader and official scoring).

Layout (``MME_Benchmark_release_version``): one directory per subtask under the root, in one of
two forms:

* flat: ``<subtask>/<stem>.jpg|png`` next to ``<subtask>/<stem>.txt`` (existence, count,
  position, color, OCR and the four cognition subtasks);
* split: ``<subtask>/images/<stem>.jpg|png`` and ``<subtask>/questions_answers_YN/<stem>.txt``
  (artwork, celebrity, landmark, posters, scene).

Each ``.txt`` line is ``question<TAB>Yes|No``; every image has two questions (one "Yes", one
"No"). Directories not named after an MME subtask (e.g. ``eval_tool``) are ignored.

Scoring (the MME eval tool): a prediction is lower-cased and stripped of surrounding whitespace;
"yes"/"no" are taken as is, otherwise the answer is "yes" if its first four characters contain
"yes", else "no" if they contain "no", else unparseable (always wrong). Per subtask: accuracy =
fraction of questions right; accuracy+ = fraction of images with both questions right; score =
100 * (accuracy + accuracy+), at most 200. Perception = sum of the 10 perception subtask scores
(max 2000), cognition = sum of the 4 cognition subtask scores (max 800); on a partial set the
sums run over the subtasks present and ``missing`` names the others.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from tokenflow import storage

PERCEPTION_SUBTASKS: tuple[str, ...] = ("existence", "count", "position", "color", "posters", "celebrity",
                                        "scene", "landmark", "artwork", "OCR")
COGNITION_SUBTASKS: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                                       "code_reasoning")
SUBTASKS: tuple[str, ...] = PERCEPTION_SUBTASKS + COGNITION_SUBTASKS
IMAGES_DIR, QUESTIONS_DIR = "images", "questions_answers_YN"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class MMEQuestion:
    """One yes/no question; ``image`` is the image's URL, ``answer`` "yes" or "no"."""

    subtask: str
    image: str
    question: str
    answer: str


def _files_by_stem(url: str, extensions: tuple[str, ...]) -> dict[str, str]:
    """File stem -> basename for the files directly under ``url`` with one of ``extensions``."""
    fs, path = storage.filesystem(url)
    names = (posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    return {posixpath.splitext(n)[0]: n for n in sorted(names) if posixpath.splitext(n)[1].lower() in extensions}


def _parse_questions(url: str) -> list[tuple[str, str]]:
    """(question, "yes"|"no") pairs of one ``.txt`` file; blank lines skipped."""
    pairs = []
    for number, line in enumerate(storage.read_bytes(url).decode("utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        question, sep, answer = line.rpartition("\t")
        answer = answer.strip().lower()
        if not sep or answer not in ("yes", "no"):
            raise ValueError(f"{url}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
        pairs.append((question.strip(), answer))
    return pairs


def _load_subtask(root_url: str, subtask: str) -> list[MMEQuestion]:
    base = storage.join(root_url, subtask)
    fs, path = storage.filesystem(base)
    split = fs.isdir(posixpath.join(path, IMAGES_DIR)) and fs.isdir(posixpath.join(path, QUESTIONS_DIR))
    image_dir = storage.join(base, IMAGES_DIR) if split else base
    text_dir = storage.join(base, QUESTIONS_DIR) if split else base
    images = _files_by_stem(image_dir, IMAGE_EXTENSIONS)
    questions = []
    for stem, name in _files_by_stem(text_dir, (".txt",)).items():
        if stem not in images:
            raise ValueError(f"{storage.join(text_dir, name)}: no image named {stem}.* in {image_dir}")
        image = storage.join(image_dir, images[stem])
        pairs = _parse_questions(storage.join(text_dir, name))
        questions.extend(MMEQuestion(subtask, image, q, a) for q, a in pairs)
    return questions


def load_mme(root_url: str) -> list[MMEQuestion]:
    """Every question of every MME subtask directory under ``root_url`` (any fsspec URL).

    Order: subtasks as in :data:`SUBTASKS`, question files by name, lines in file order.
    """
    fs, path = storage.filesystem(root_url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"MME root not found: {root_url}")
    present = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False) if fs.isdir(p)}
    questions = [q for subtask in SUBTASKS if subtask in present for q in _load_subtask(root_url, subtask)]
    if not questions:
        raise ValueError(f"{root_url}: no MME subtask directories with questions (expected some of {SUBTASKS})")
    return questions


def parse_answer(prediction: str) -> str:
    """A model's reply as "yes", "no" or "other" (the MME eval tool's rule, whitespace-stripped)."""
    text = prediction.strip().lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


@dataclass(frozen=True)
class SubtaskScore:
    accuracy: float
    accuracy_plus: float
    score: float
    num_questions: int
    num_images: int


@dataclass(frozen=True)
class MMEScores:
    """Per-subtask scores, the perception and cognition totals, and the subtasks not scored."""

    subtasks: dict[str, SubtaskScore]
    perception: float
    cognition: float
    missing: tuple[str, ...]

    def metrics(self) -> dict[str, float]:
        """Flat name -> value mapping for tracking."""
        out = {"perception": self.perception, "cognition": self.cognition}
        for name, s in self.subtasks.items():
            out.update({f"{name}/accuracy": s.accuracy, f"{name}/accuracy_plus": s.accuracy_plus,
                        f"{name}/score": s.score})
        return out


def score_mme(questions: Sequence[MMEQuestion], predictions: Sequence[str]) -> MMEScores:
    """Score raw model replies, one per question, in the same order."""
    if len(questions) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    if not questions:
        raise ValueError("no MME questions to score")
    right: dict[str, list[bool]] = defaultdict(list)
    per_image: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for q, prediction in zip(questions, predictions):
        if q.subtask not in SUBTASKS:
            raise ValueError(f"unknown MME subtask {q.subtask!r}")
        ok = parse_answer(prediction) == q.answer
        right[q.subtask].append(ok)
        per_image[(q.subtask, q.image)].append(ok)
    subtasks = {}
    for name in SUBTASKS:
        if name not in right:
            continue
        images = [all(flags) for (subtask, _), flags in per_image.items() if subtask == name]
        accuracy = sum(right[name]) / len(right[name])
        accuracy_plus = sum(images) / len(images)
        subtasks[name] = SubtaskScore(accuracy, accuracy_plus, 100.0 * (accuracy + accuracy_plus),
                                      len(right[name]), len(images))
    return MMEScores(subtasks,
                     perception=sum(s.score for n, s in subtasks.items() if n in PERCEPTION_SUBTASKS),
                     cognition=sum(s.score for n, s in subtasks.items() if n in COGNITION_SUBTASKS),
                     missing=tuple(n for n in SUBTASKS if n not in subtasks))
