"""DPG-Bench (ELLA, TencentQQGYLab): dense prompts, each checked by yes/no questions on a DSG-style
dependency graph, asked by a VQA model of each of the four images of a 2x2 grid.

Release layout (``dpg_bench/`` of the ELLA repository)::

    <root>/prompts/<item_id>.txt    the prompt (whitespace around it stripped)
    <root>/dpg_bench.csv            one row per question, with the columns of :data:`COLUMNS`

Per row: ``proposition_id`` (1, 2, ... within the item), ``dependency`` (comma-separated
proposition ids of the parents; ``0`` means none), ``tuple`` such as ``entity - whole (truck)``
or ``relation - spatial (truck, beach, on)`` (its text before ``(`` is the question's category,
``<broad> - <detailed>``) and ``question_natural_language``. :func:`load_dpg` needs only the
columns of :data:`REQUIRED_COLUMNS`; the file is read whole (at most :data:`MAX_CSV_BYTES`) and a
bad row fails the load naming its line and column, as do non-contiguous rows of one item (the
official reader would silently keep only the last run), a repeated proposition id and a parent
the item does not have.

Scoring, as ``compute_dpg_bench.py`` does it: the generated grid ``<item_id>.png`` is cut into
its four tiles (top-left, top-right, bottom-left, bottom-right); every question is asked of every
tile and scores 1 when the answer is exactly ``yes``. Then, per tile, one pass over the questions
in CSV order sets a question to 0 when any of its parents is 0 (so a failure runs down chains
whose parents come first). A tile's score is the mean over the item's questions, the item's the
mean over its tiles, ``overall`` the mean over items. Category scores pool the questions' answers
*before* the dependency rule (the official script's ``qid2scores_orig``): ``<broad>`` per broad
category, ``<broad>/<detailed>`` per detailed one.

Two upstream bugs are fixed here, and ``upstream_bugs=True`` reproduces them (the official
numbers): the category scores keep only the last tile's answers (ELLA issue #60; fixed: each
question's mean over the four tiles), and the CSV's first data row is skipped (issue #61; per the
issue, partiprompts97's first question). When another question of that item depends on the
skipped one, the official parent lookup fails and the script drops the item from every score;
reproduced as an unscored item (``unscored_prompts``).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, replace
from statistics import fmean
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from tokenflow import storage
from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig
from tokenflow.data.decode import decode_image

CSV_NAME = "dpg_bench.csv"
PROMPTS_DIR = "prompts"
COLUMNS: tuple[str, ...] = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                            "category_detailed", "tuple", "question_natural_language")
REQUIRED_COLUMNS: tuple[str, ...] = ("item_id", "proposition_id", "dependency", "tuple", "question_natural_language")
MAX_CSV_BYTES = 64 * 2**20
MAX_PROMPT_BYTES = 64 * 2**10
YES = "yes"
GRID_SIDE = 2
IMAGES_PER_PROMPT = GRID_SIDE * GRID_SIDE
_ITEM_ID = re.compile(r"[A-Za-z0-9_-]+")
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class DPGQuestion:
    """One row of ``dpg_bench.csv``; ``proposition`` is its ``tuple`` column, ``parents`` its
    ``dependency`` without the ``0`` that means none."""

    proposition_id: int
    parents: tuple[int, ...]
    proposition: str
    question: str
    keywords: str = ""
    category_broad: str = ""
    category_detailed: str = ""

    @property
    def category(self) -> str:
        """``<broad> - <detailed>``: the proposition's text before ``(``."""
        return self.proposition.split("(", 1)[0].strip()


@dataclass(frozen=True)
class DPGItem:
    """One prompt and its questions, in CSV order."""

    item_id: str
    prompt: str
    questions: tuple[DPGQuestion, ...]


# --------------------------------------------------------------------------- files


def prompt_url(root_url: str, item_id: str) -> str:
    return storage.join(root_url, PROMPTS_DIR, f"{item_id}.txt")


def _int(text: str, low: int) -> int:
    value = int(text.strip())  # ValueError for anything but an integer
    if value < low:
        raise ValueError(f"{value} is below {low}")
    return value


class _RowError(ValueError):
    def __init__(self, column: str, problem: str):
        super().__init__(f"column {column!r}: {problem}")


def _question(row: Mapping[str, str | None]) -> tuple[str, DPGQuestion]:
    """(item id, question) of one CSV row; raises ``_RowError`` naming the column."""
    for column in REQUIRED_COLUMNS:
        if not (row.get(column) or "").strip():
            raise _RowError(column, "empty")
    item_id = row["item_id"].strip()
    if not _ITEM_ID.fullmatch(item_id):
        raise _RowError("item_id", f"{item_id!r} is not a plain file stem (letters, digits, _ and -)")
    try:
        pid = _int(row["proposition_id"], 1)
    except ValueError as exc:
        raise _RowError("proposition_id", f"not a positive integer ({exc})") from None
    try:
        parents = tuple(p for p in (_int(d, 0) for d in row["dependency"].split(",")) if p != 0)
    except ValueError as exc:
        raise _RowError("dependency", f"not comma-separated proposition ids ({exc})") from None
    if pid in parents:
        raise _RowError("dependency", f"proposition {pid} depends on itself")
    question = DPGQuestion(pid, parents, row["tuple"].strip(), row["question_natural_language"].strip(),
                           *((row.get(c) or "").strip() for c in ("keywords", "category_broad", "category_detailed")))
    if not question.category:
        raise _RowError("tuple", f"{question.proposition!r} names no category before '('")
    return item_id, question


def _questions(csv_url: str) -> dict[str, list[DPGQuestion]]:
    """Item id -> its questions, items and questions in file order, every parent checked."""
    text = storage.read_text_bounded(csv_url, MAX_CSV_BYTES, "DPG-Bench question file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{csv_url}: the header lacks {', '.join(missing)} "
                         f"(expected the columns {', '.join(COLUMNS)})")
    items: dict[str, list[DPGQuestion]] = {}
    lines: dict[tuple[str, int], int] = {}
    previous = None
    for row in reader:
        where = f"{csv_url}: line {reader.line_num}"
        if None in row:
            raise ValueError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
        if None in row.values():
            raise ValueError(f"{where}: fewer fields than the header's {len(reader.fieldnames)}")
        try:
            item_id, question = _question(row)
        except _RowError as exc:
            raise ValueError(f"{where}, {exc}") from None
        if item_id != previous and item_id in items:
            raise ValueError(f"{where}: item {item_id!r} continues here after other items' rows (an item's rows "
                             "must be contiguous)")
        if (item_id, question.proposition_id) in lines:
            raise ValueError(f"{where}, column 'proposition_id': item {item_id!r} already has proposition "
                             f"{question.proposition_id} (line {lines[item_id, question.proposition_id]})")
        items.setdefault(item_id, []).append(question)
        lines[item_id, question.proposition_id] = reader.line_num
        previous = item_id
    if not items:
        raise ValueError(f"{csv_url}: no questions")
    for item_id, questions in items.items():
        known = {q.proposition_id for q in questions}
        for q in questions:
            if unknown := [p for p in q.parents if p not in known]:
                raise ValueError(f"{csv_url}: line {lines[item_id, q.proposition_id]}, column 'dependency': item "
                                 f"{item_id!r} has no proposition {unknown[0]}")
    return items


def load_dpg(root_url: str) -> list[DPGItem]:
    """Every item of ``<root_url>/dpg_bench.csv`` (CSV order) with its prompt from
    ``<root_url>/prompts/<item_id>.txt``; any fsspec URL."""
    items = []
    for item_id, questions in _questions(storage.join(root_url, CSV_NAME)).items():
        url = prompt_url(root_url, item_id)
        prompt = storage.read_text_bounded(url, MAX_PROMPT_BYTES, "DPG-Bench prompt file").strip()
        if not prompt:
            raise ValueError(f"{url}: empty prompt")
        items.append(DPGItem(item_id, prompt, tuple(questions)))
    return items


def write_dpg(root_url: str, items: Sequence[DPGItem]) -> None:
    """The items in the release layout under ``root_url`` (the prompt doubles as ``text``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for item in items:
        storage.write_bytes_atomic(prompt_url(root_url, item.item_id), item.prompt.encode())
        for q in item.questions:
            writer.writerow([item.item_id, item.prompt, q.keywords, q.proposition_id,
                             ",".join(map(str, q.parents)) or "0", q.category_broad, q.category_detailed,
                             q.proposition, q.question])
    storage.write_bytes_atomic(storage.join(root_url, CSV_NAME), buffer.getvalue().encode())


# --------------------------------------------------------------------------- grids


def grid_url(outdir: str, item_id: str) -> str:
    """Where the official script looks for an item's grid: ``<outdir>/<item_id>.png``."""
    return storage.join(outdir, f"{item_id}.png")


def tile_grid(images: Sequence[np.ndarray]) -> np.ndarray:
    """Four uint8 ``[S, S, 3]`` images as one ``[2S, 2S, 3]`` grid, row-major (image 0 top left)."""
    if len(images) != IMAGES_PER_PROMPT or len({im.shape for im in images}) != 1:
        raise ValueError(f"a DPG grid takes {IMAGES_PER_PROMPT} images of one shape, got "
                         f"{[im.shape for im in images]}")
    rows = [np.concatenate(images[r * GRID_SIDE : (r + 1) * GRID_SIDE], axis=1) for r in range(GRID_SIDE)]
    return np.concatenate(rows, axis=0)


def split_grid(grid: Image.Image) -> list[Image.Image]:
    """The four tiles of a square grid with an even side, in the official crop order (top left,
    top right, bottom left, bottom right)."""
    width, height = grid.size
    if width != height or width % GRID_SIDE:
        raise ValueError(f"a DPG grid is square with an even side, got {width}x{height}")
    side = width // GRID_SIDE
    return [grid.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
            for r in range(GRID_SIDE) for c in range(GRID_SIDE)]


def write_grid(outdir: str, item_id: str, images: Sequence[np.ndarray]) -> None:
    buffer = io.BytesIO()
    Image.fromarray(tile_grid(images)).save(buffer, format="PNG")
    storage.write_bytes_atomic(grid_url(outdir, item_id), buffer.getvalue())


def read_grid(outdir: str, item_id: str, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> list[Image.Image]:
    """The four tiles of an item's grid; raises ``FileNotFoundError``, ``DecodeError`` or ``ValueError``."""
    return split_grid(decode_image(storage.read_bytes(grid_url(outdir, item_id)), limits))


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class PromptScore:
    """One item's score; ``score`` None when the official script would skip it (upstream bug
    #61 only). ``categories`` holds (category, score) per question, before the dependency rule."""

    item_id: str
    score: float | None
    tile_scores: tuple[float, ...]
    categories: tuple[tuple[str, float], ...]


class _MissingParent(LookupError):
    pass


def _tile(questions: Sequence[DPGQuestion], answers: Mapping[int, str]) -> tuple[dict[int, float], dict[int, float]]:
    """(answers as 0/1, the same after the dependency rule) for one tile."""
    raw = {q.proposition_id: float(answers[q.proposition_id] == YES) for q in questions}
    scores = dict(raw)
    for q in questions:  # one pass in CSV order, as the official script
        for parent in q.parents:
            if parent not in scores:  # only a parent skipped with the first row (upstream bug #61)
                raise _MissingParent(parent)
            if scores[parent] == 0.0:
                scores[q.proposition_id] = 0.0
                break
    return raw, scores


def score_prompt(item: DPGItem, tiles: Sequence[Mapping[int, str]], upstream_bugs: bool = False) -> PromptScore:
    """An item from its answers per tile (proposition id -> the VQA model's answer)."""
    if not item.questions or not tiles:
        return PromptScore(item.item_id, None, (), ())
    try:
        scored = [_tile(item.questions, answers) for answers in tiles]
    except _MissingParent:  # the official script's parent lookup fails: it skips the item
        return PromptScore(item.item_id, None, (), ())
    tile_scores = tuple(fmean(scores.values()) for _, scores in scored)
    raws = [raw for raw, _ in (scored[-1:] if upstream_bugs else scored)]
    categories = tuple((q.category, fmean(raw[q.proposition_id] for raw in raws)) for q in item.questions)
    return PromptScore(item.item_id, fmean(tile_scores), tile_scores, categories)


def _scored_items(items: Sequence[DPGItem], upstream_bugs: bool = False) -> list[DPGItem]:
    """The items as scored: with ``upstream_bugs`` the first item lacks its first question."""
    if not upstream_bugs or not items:
        return list(items)
    return [replace(items[0], questions=items[0].questions[1:]), *items[1:]]


def _metric_name(text: str) -> str:
    return _METRIC_UNSAFE.sub("_", text.strip()).strip("_") or "_"


@dataclass(frozen=True)
class DPGScores:
    prompts: tuple[PromptScore, ...]
    num_questions: int

    def metrics(self) -> dict[str, float]:
        """``overall`` and the category scores (fractions; the official script prints them x100),
        ``num_prompts``, ``num_questions``, ``unscored_prompts``."""
        scored = [p for p in self.prompts if p.score is not None]
        pooled: dict[str, list[float]] = {}
        for p in scored:
            for category, value in p.categories:
                broad, _, detailed = category.partition("-")
                pooled.setdefault(_metric_name(broad), []).append(value)
                if detailed.strip():
                    pooled.setdefault(f"{_metric_name(broad)}/{_metric_name(detailed)}", []).append(value)
        return {"overall": fmean(p.score for p in scored) if scored else 0.0,
                **{name: fmean(values) for name, values in sorted(pooled.items())},
                "num_prompts": float(len(self.prompts)), "num_questions": float(self.num_questions),
                "unscored_prompts": float(len(self.prompts) - len(scored))}


def score_dpg(items: Sequence[DPGItem], answers: Mapping[str, Sequence[Mapping[int, str]]],
              upstream_bugs: bool = False) -> DPGScores:
    """Every item from its tiles' answers (``answers[item_id][tile][proposition_id]``); see the
    module docstring for the rules and the two upstream bugs."""
    asked = _scored_items(items, upstream_bugs)
    return DPGScores(tuple(score_prompt(item, answers[item.item_id], upstream_bugs) for item in asked),
                     sum(len(item.questions) for item in asked))
