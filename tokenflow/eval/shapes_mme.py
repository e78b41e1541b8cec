"""The `shapes` MME set: held-out shapes images and their yes/no questions in MME's layout.

Every held-out sample carries one pair of questions of one type (existence, count, color or
position; :func:`tokenflow.data.shapes.make_questions`), which names its MME subtask. The set is
written in MME's flat layout, readable by :func:`tokenflow.eval.mme.load_mme`::

    <out>/<subtask>/<name>.png
    <out>/<subtask>/<name>.txt    "<question> Please answer yes or no.<TAB>Yes|No", one per line

``<name>`` is the sample key made safe as a file name (:func:`tokenflow.storage.safe_name`): a
key from the data never becomes a path of its own.

Questions keep the sample's order; the suffix and the capitalised answers follow MME's files.
"""

from __future__ import annotations

import io
import logging
from typing import Iterable

from PIL import Image

from tokenflow import storage
from tokenflow.data.corpus import RawSample
from tokenflow.data.sample_json import SampleJSONError, parse_sample_object
from tokenflow.data.shapes import QUESTION_TYPES, encode_png

log = logging.getLogger(__name__)

QUESTION_SUFFIX = " Please answer yes or no."
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(data: bytes) -> bytes:
    """The image as PNG bytes (unchanged when it already is one)."""
    if data.startswith(_PNG_SIGNATURE):
        return data
    with Image.open(io.BytesIO(data)) as image:
        return encode_png(image.convert("RGB"))


def write_shapes_mme(out_url: str, samples: Iterable[RawSample], per_subtask: int) -> dict[str, int]:
    """Write up to ``per_subtask`` images per subtask from held-out shapes samples.

    ``samples`` are the held-out split's records (e.g. :func:`tokenflow.data.corpus.iter_shard`
    over its shards). Returns the number of images written per subtask.
    """
    if per_subtask < 1:
        raise ValueError(f"per_subtask must be positive, got {per_subtask}")
    written = {subtask: 0 for subtask in QUESTION_TYPES}
    for sample in samples:
        if all(n >= per_subtask for n in written.values()):
            break
        if sample.image is None or not sample.json:
            continue
        try:
            questions = parse_sample_object(sample.json, {"questions": list})["questions"]
            subtask = questions[0]["type"]
            lines = "".join(f"{q['question']}{QUESTION_SUFFIX}\t{q['answer'].capitalize()}\n" for q in questions)
        except (SampleJSONError, IndexError, KeyError, TypeError, AttributeError) as exc:
            log.warning("held-out sample %r has no usable questions (%s): %r", sample.key,
                        getattr(exc, "reason", "json_schema"), exc)
            continue
        if subtask not in QUESTION_TYPES:
            log.warning("held-out sample %r: question type %r is not one of %s", sample.key, subtask,
                        ", ".join(QUESTION_TYPES))
            continue
        if written[subtask] >= per_subtask:
            continue
        name = storage.safe_name(sample.key)
        storage.write_bytes_atomic(storage.join(out_url, subtask, f"{name}.png"), png_bytes(sample.image))
        storage.write_bytes_atomic(storage.join(out_url, subtask, f"{name}.txt"), lines.encode("utf-8"))
        written[subtask] += 1
    return written
