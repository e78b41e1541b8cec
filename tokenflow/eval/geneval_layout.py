"""GenEval's folder of generated images, as the official generation script writes it and its
evaluation script reads it, so the official scorer can be pointed at a stage's output unchanged::

    <outdir>/<NNNNN>/metadata.jsonl       the prompt's metadata record (one line)
    <outdir>/<NNNNN>/samples/<NNNN>.png   its images

``NNNNN`` is the prompt's index in the metadata file, ``NNNN`` the image's index.
"""

from __future__ import annotations

import io
import json
from typing import Sequence

import numpy as np
from PIL import Image

from tokenflow import storage
from tokenflow.eval.geneval import GenEvalPrompt

METADATA_NAME = "metadata.jsonl"
SAMPLES_DIR = "samples"


def prompt_dir(outdir: str, index: int) -> str:
    return storage.join(outdir, f"{index:05d}")


def image_url(outdir: str, index: int, image: int) -> str:
    return storage.join(prompt_dir(outdir, index), SAMPLES_DIR, f"{image:04d}.png")


def write_prompt(outdir: str, index: int, prompt: GenEvalPrompt, images: Sequence[np.ndarray]) -> None:
    """The prompt's metadata line and its images (uint8 ``[H, W, 3]``) as PNGs."""
    folder = prompt_dir(outdir, index)
    storage.write_bytes_atomic(storage.join(folder, METADATA_NAME), (json.dumps(prompt.to_json()) + "\n").encode())
    for j, pixels in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        storage.write_bytes_atomic(image_url(outdir, index, j), buffer.getvalue())


def read_prompt(outdir: str, index: int) -> GenEvalPrompt:
    """The metadata record of prompt ``index``; raises ``ValueError`` when it is not one."""
    url = storage.join(prompt_dir(outdir, index), METADATA_NAME)
    try:
        return GenEvalPrompt.from_json(json.loads(storage.read_bytes(url)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{url}: not a GenEval metadata record: {exc}") from exc
