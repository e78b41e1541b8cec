"""The `shapes` DPG-Bench set: held-out shapes scenes written in DPG-Bench's layout
(``prompts/<item_id>.txt`` and ``dpg_bench.csv`` with its columns), and the grammar of its
questions, which :class:`~tokenflow.eval.dpg_vqa.ShapesVQA` reads back.

A scene is used when it holds at least two (colour, shape) groups of different shapes, so "the
circle" names one group; its prompt is the corpus caption ("a red circle left of two blue
squares"), which the generator was trained on. Propositions, in this order (all expect "yes"):

| tuple | question | parents |
|---|---|---|
| ``entity - whole (circle)`` | Is there a circle? | none |
| ``attribute - color (circle, red)`` | Is the circle red? / Are the circles red? | its entity |
| ``other - count (circle, ==2)`` | Is there exactly one circle? / Are there exactly two circles? | its entity |
| ``relation - spatial (circle, square, left of)`` | Is the circle left of the square? | both entities |

one entity per group, then each group's colour and count, then (two groups only: the caption
names their relation) the relation, the corpus' :func:`~tokenflow.data.shapes.spatial_relation`
of the two groups' centres. Scenes come in held-out order, captions are not repeated; item ids
are ``shapes_<NNNN>``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable, TypeVar

from tokenflow.data.corpus import RawSample
from tokenflow.data.shapes import (NUMBER_WORDS, OPPOSITE_RELATION, PALETTE, SHAPES, Group, Scene, caption,
                                   spatial_relation)
from tokenflow.eval.dpg import DPGItem, DPGQuestion, write_dpg
from tokenflow.eval.shapes_geneval import sample_scenes

log = logging.getLogger(__name__)

S = TypeVar("S")

_SHAPE = "|".join(SHAPES)
_COLOR = "|".join(PALETTE)
_NUMBER = "|".join(NUMBER_WORDS.values())
_RELATION = "|".join(OPPOSITE_RELATION)
_COUNTS = {word: n for n, word in NUMBER_WORDS.items()}
_FORMS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("entity", re.compile(rf"Is there an? (?P<shape>{_SHAPE})\?")),
    ("color", re.compile(rf"(?:Is|Are) the (?P<shape>{_SHAPE})s? (?P<color>{_COLOR})\?")),
    ("count", re.compile(rf"(?:Is|Are) there exactly (?P<count>{_NUMBER}) (?P<shape>{_SHAPE})s?\?")),
    ("relation", re.compile(rf"(?:Is|Are) the (?P<shape>{_SHAPE})s? (?P<relation>{_RELATION}) "
                            rf"the (?P<other>{_SHAPE})s?\?")),
)


@dataclass(frozen=True)
class Claim:
    """What a shapes DPG question asks: ``kind`` entity, color, count or relation about ``shape``."""

    kind: str
    shape: str
    color: str | None = None
    count: int | None = None
    relation: str | None = None
    other: str | None = None


def parse_question(question: str) -> Claim:
    """The claim of a question in this set's grammar; ``ValueError`` for any other question."""
    for kind, pattern in _FORMS:
        if match := pattern.fullmatch(question.strip()):
            fields = match.groupdict()
            count = fields.pop("count", None)
            return Claim(kind, **fields, **({"count": _COUNTS[count]} if count else {}))
    raise ValueError(f"not a shapes DPG question: {question!r}")


def _subject(g: Group) -> tuple[str, str]:
    """(verb, "the <shape>[s]") of a group."""
    return ("Is", f"the {g.shape}") if g.count == 1 else ("Are", f"the {g.shape}s")


def _count_question(g: Group) -> str:
    if g.count == 1:
        return f"Is there exactly one {g.shape}?"
    return f"Are there exactly {NUMBER_WORDS[g.count]} {g.shape}s?"


def questions_for_scene(scene: Scene) -> tuple[DPGQuestion, ...] | None:
    """The scene's propositions (module docstring), or None when the scene is not eligible."""
    groups = scene.groups()
    if len(groups) < 2 or len({g.shape for g in groups}) != len(groups):
        return None
    out: list[DPGQuestion] = []

    def add(parents: tuple[int, ...], category: str, args: str, question: str) -> int:
        broad, detailed = category.split(" - ")
        out.append(DPGQuestion(len(out) + 1, parents, f"{category} ({args})", question, args, broad, detailed))
        return len(out)

    entity = {g.shape: add((), "entity - whole", g.shape, f"Is there a {g.shape}?") for g in groups}
    for g in groups:
        verb, subject = _subject(g)
        add((entity[g.shape],), "attribute - color", f"{g.shape}, {g.color}", f"{verb} {subject} {g.color}?")
        add((entity[g.shape],), "other - count", f"{g.shape}, =={g.count}", _count_question(g))
    if len(groups) == 2:
        a, b = groups
        relation = spatial_relation(a.center, b.center)  # the caption's
        verb, subject = _subject(a)
        add((entity[a.shape], entity[b.shape]), "relation - spatial", f"{a.shape}, {b.shape}, {relation}",
            f"{verb} {subject} {relation} {_subject(b)[1]}?")
    return tuple(out)


def shapes_dpg_items(sourced_scenes: Iterable[tuple[S, Scene]], num_prompts: int) -> list[tuple[S, DPGItem]]:
    """Up to ``num_prompts`` items from eligible scenes with distinct captions, each with its source."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be positive, got {num_prompts}")
    chosen: dict[str, tuple[S, DPGItem]] = {}
    for source, scene in sourced_scenes:
        questions = questions_for_scene(scene)
        text = caption(scene)
        if questions is not None and text not in chosen:
            chosen[text] = (source, DPGItem(f"shapes_{len(chosen):04d}", text, questions))
            if len(chosen) == num_prompts:
                break
    return list(chosen.values())


def write_shapes_dpg(root_url: str, samples: Iterable[RawSample], num_prompts: int) -> list[tuple[RawSample, DPGItem]]:
    """Write the set built from held-out shapes samples in DPG-Bench's layout under ``root_url``;
    returns each item with the sample it was written from (whose image answers every question yes)."""
    sourced = shapes_dpg_items(sample_scenes(samples), num_prompts)
    if len(sourced) < num_prompts:
        log.warning("the held-out split gave %d shapes DPG prompts of the %d asked for", len(sourced), num_prompts)
    write_dpg(root_url, [item for _, item in sourced])
    return sourced
