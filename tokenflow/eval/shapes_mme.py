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
import json
from typing import Iterable

from PIL import Image

from tokenflow import storage
from tokenflow.data.corpus import RawSample
from tokenflow.data.shapes import QUESTION_TYPES, encode_png

QUESTION_SUFFIX = " Please answer yes or no."
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_bytes(data: bytes) -> bytes:
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
        questions = json.loads(sample.json)["questions"]
        subtask = questions[0]["type"]
        if subtask not in written:
            raise ValueError(f"held-out sample {sample.key!r}: question type {subtask!r} is not one of "
                             f"{', '.join(QUESTION_TYPES)}")
        if written[subtask] >= per_subtask:
            continue
        lines = "".join(f"{q['question']}{QUESTION_SUFFIX}\t{q['answer'].capitalize()}\n" for q in questions)
        name = storage.safe_name(sample.key)
        storage.write_bytes_atomic(storage.join(out_url, subtask, f"{name}.png"), _png_bytes(sample.image))
        storage.write_bytes_atomic(storage.join(out_url, subtask, f"{name}.txt"), lines.encode("utf-8"))
        written[subtask] += 1
    return written
