"""The `shapes` GenEval prompt set, built from held-out shapes scenes.

Each held-out scene's caption (the corpus grammar, so the generator has seen the phrasing)
becomes a prompt of one GenEval tag its structure supports; classes are shape names
(circle/square/triangle), colours palette names (all within GenEval's colour list):

| tag | scene | include / exclude |
|---|---|---|
| single_object | one object | ``[{shape, 1}]`` |
| colors | one object | ``[{shape, 1, colour}]`` |
| counting | one group of n >= 2 | ``[{shape, n}]``, exclude ``[{shape, n + 1}]`` |
| two_object | two single objects, different shapes | ``[{A, 1}, {B, 1}]`` |
| position | same, "A rel B" | ``[{B, 1}, {A, 1, position: [rel, 0]}]`` |
| color_attr | same | ``[{A, 1, colour A}, {B, 1, colour B}]`` |

A position prompt is made only when the scene's own boxes satisfy GenEval's margin rule for the
caption's relation, so every prompt is met by the scene it came from. Each scene yields at most
one prompt (the eligible tag with the fewest prompts so far, tags in :data:`TAGS` order on ties);
a tag never repeats a prompt text.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, TypeVar

from tokenflow.data.corpus import RawSample
from tokenflow.data.sample_json import SampleJSONError, parse_sample_object
from tokenflow.data.shapes import Scene, SceneObject, caption, spatial_relation
from tokenflow.eval.geneval import TAGS, Exclude, GenEvalPrompt, Include, relative_position, write_metadata

log = logging.getLogger(__name__)

S = TypeVar("S")


def scene_from_record(record: Mapping[str, Any]) -> Scene:
    """The scene of a shapes sample's ``.json`` record (its ``objects`` list)."""
    return Scene(tuple(SceneObject(o["shape"], o["color"], tuple(o["bbox"]), tuple(o["center"]))
                       for o in record["objects"]))


def prompts_for_scene(scene: Scene) -> dict[str, GenEvalPrompt]:
    """Tag -> prompt for every tag the scene supports (see the module docstring)."""
    groups = scene.groups()
    text = caption(scene)
    out: dict[str, GenEvalPrompt] = {}
    if len(groups) == 1:
        g = groups[0]
        if g.count == 1:
            out["single_object"] = GenEvalPrompt("single_object", text, (Include(g.shape, 1),))
            out["colors"] = GenEvalPrompt("colors", text, (Include(g.shape, 1, g.color),))
        else:
            out["counting"] = GenEvalPrompt("counting", text, (Include(g.shape, g.count),),
                                            (Exclude(g.shape, g.count + 1),))
    elif len(groups) == 2 and all(g.count == 1 for g in groups) and groups[0].shape != groups[1].shape:
        a, b = groups
        out["two_object"] = GenEvalPrompt("two_object", text, (Include(a.shape, 1), Include(b.shape, 1)))
        relation = spatial_relation(a.center, b.center)  # the caption's relation
        box_a, box_b = (next(o.bbox for o in scene.objects if o.shape == g.shape) for g in (a, b))
        if relation in relative_position(box_a, box_b):
            out["position"] = GenEvalPrompt("position", text,
                                            (Include(b.shape, 1), Include(a.shape, 1, position=(relation, 0))))
        out["color_attr"] = GenEvalPrompt("color_attr", text,
                                          (Include(a.shape, 1, a.color), Include(b.shape, 1, b.color)))
    return out


def _select(sourced_scenes: Iterable[tuple[S, Scene]], per_tag: int) -> list[tuple[S, GenEvalPrompt]]:
    """:func:`shapes_geneval_prompts`, each prompt with the source of the scene it came from."""
    if per_tag < 1:
        raise ValueError(f"per_tag must be positive, got {per_tag}")
    chosen: dict[str, dict[str, tuple[S, GenEvalPrompt]]] = {tag: {} for tag in TAGS}
    for source, scene in sourced_scenes:
        candidates = [(len(chosen[tag]), TAGS.index(tag), prompt)
                      for tag, prompt in prompts_for_scene(scene).items()
                      if len(chosen[tag]) < per_tag and prompt.prompt not in chosen[tag]]
        if candidates:
            prompt = min(candidates, key=lambda c: c[:2])[2]
            chosen[prompt.tag][prompt.prompt] = (source, prompt)
        if all(len(prompts) == per_tag for prompts in chosen.values()):
            break
    return [pair for tag in TAGS for pair in chosen[tag].values()]


def shapes_geneval_prompts(scenes: Iterable[Scene], per_tag: int) -> list[GenEvalPrompt]:
    """Up to ``per_tag`` distinct prompts per tag from ``scenes``, grouped by tag in TAGS order."""
    return [prompt for _, prompt in _select(((None, scene) for scene in scenes), per_tag)]


def sample_scenes(samples: Iterable[RawSample]) -> Iterable[tuple[RawSample, Scene]]:
    """Each sample with the scene of its ``.json`` record; a sample without a usable record is
    skipped with a warning that says why."""
    for sample in samples:
        if not sample.json:
            continue
        try:
            yield sample, scene_from_record(parse_sample_object(sample.json, {"objects": list}))
        except (SampleJSONError, KeyError, TypeError, ValueError) as exc:  # SampleJSONError is a ValueError
            log.warning("held-out sample %r has no usable scene record (%s): %r", sample.key,
                        getattr(exc, "reason", "json_schema"), exc)


def write_shapes_geneval_prompts(out_url: str, samples: Iterable[RawSample],
                                 per_tag: int) -> list[tuple[RawSample, GenEvalPrompt]]:
    """Write the prompt set built from held-out shapes samples as GenEval metadata JSONL; returns
    each prompt with the sample it was written from (whose image meets the prompt).

    ``samples`` are the held-out split's records (e.g. :func:`tokenflow.data.corpus.iter_shard`
    over its shards); the corpus seed fixes them, so the same corpus gives the same file.
    """
    sourced = _select(sample_scenes(samples), per_tag)
    write_metadata(out_url, [prompt for _, prompt in sourced])
    return sourced
