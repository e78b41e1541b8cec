"""VQA models that answer DPG-Bench questions about one image (a tile of a grid).

* :class:`TransformersVQA`: a transformers VQA checkpoint in a local directory. The official
  scorer is mPLUG-large (``damo/mplug_visual-question-answering_coco_large_en``) through
  modelscope, which transformers does not port; any ``AutoModelForVisualQuestionAnswering`` model
  stands in (BLIP's ``Salesforce/blip-vqa-capfilt-large`` is the closest: a generative VQA model
  fine-tuned on VQA v2), so absolute scores are comparable only between runs of one VQA model.
  Generative models answer with their greedy decoding, classifier heads (ViLT) with their top
  label. Nothing is downloaded.
* :class:`ShapesVQA`: exact answers to the `shapes` set's questions
  (:func:`~tokenflow.eval.shapes_dpg.parse_question`) from the exact shapes detector.

An answer scores when it is exactly ``yes`` (:data:`tokenflow.eval.dpg.YES`), as the official
script compares mPLUG's reply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from tokenflow.data.shapes import spatial_relation
from tokenflow.eval.dpg import YES
from tokenflow.eval.shapes_detector import Detection, detect_shapes
from tokenflow.eval.shapes_dpg import Claim, parse_question


class VQAScorer(Protocol):
    def answer(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """One answer per question about ``image``."""


class TransformersVQA:
    """A local transformers VQA model (module docstring); ``max_new_tokens`` bounds a generated answer."""

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu", max_new_tokens: int = 10):
        from transformers import AutoModelForVisualQuestionAnswering, AutoProcessor

        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"DPG-Bench VQA model (transformers model directory) not found: {path}")
        self.processor = AutoProcessor.from_pretrained(str(path))
        self.model = AutoModelForVisualQuestionAnswering.from_pretrained(str(path)).to(device).eval()
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def answer(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        rgb = image.convert("RGB")
        inputs = self.processor(images=[rgb] * len(questions), text=list(questions), return_tensors="pt",
                                padding=True).to(self.device)
        if self.model.can_generate():
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
            return [text.strip() for text in self.processor.batch_decode(generated, skip_special_tokens=True)]
        labels = self.model(**inputs).logits.argmax(-1)
        return [self.model.config.id2label[int(i)] for i in labels]


class ShapesVQA:
    """Exact answers about `shapes` images: the detector's objects scoring at least ``min_score``
    (template IoU) with at least ``min_area`` pixels (the shapes GenEval detector's)."""

    def __init__(self, min_area: int = 60, min_score: float = 0.3):
        self.min_area = min_area
        self.min_score = min_score

    def answer(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        detections = [d for d in detect_shapes(image, min_area=self.min_area) if d.score >= self.min_score]
        return [YES if _holds(parse_question(q), detections) else "no" for q in questions]


def _center(objects: Sequence[Detection]) -> tuple[float, float]:
    return float(np.mean([d.center[0] for d in objects])), float(np.mean([d.center[1] for d in objects]))


def _holds(claim: Claim, detections: Sequence[Detection]) -> bool:
    """Whether the detected objects make the claim true (a colour: every object of the shape has it)."""
    objects = [d for d in detections if d.shape == claim.shape]
    if claim.kind == "count":
        return len(objects) == claim.count
    if not objects:
        return False
    if claim.kind == "color":
        return all(d.color == claim.color for d in objects)
    if claim.kind == "relation":
        others = [d for d in detections if d.shape == claim.other]
        return bool(others) and spatial_relation(_center(objects), _center(others)) == claim.relation
    return True  # entity
